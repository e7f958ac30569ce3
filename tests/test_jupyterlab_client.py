"""
The unmodified @jupyterlab/services (JupyterLab's own client library) against a
real daemon, in both WebSocket framings: the default JSON one and the
``v1.kernel.websocket.jupyter.org`` subprotocol.

``tests/jupyterlab_client/run.mjs`` does what a JupyterLab extension does
(SessionManager, KernelManager, a KernelConnection) and prints one JSON line
per step with what it saw; here we assert what a user would see. setup.sh
installs its node_modules (``npm ci``) from the lock file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_DIR = os.path.join(HERE, "jupyterlab_client")
NODE = shutil.which("node")
RUN_TIMEOUT = 60  # seconds for one whole run of the script (it takes ~1 s)

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (setup.sh installs nodejs)"),
    pytest.mark.skipif(
        not os.path.isdir(os.path.join(CLIENT_DIR, "node_modules", "@jupyterlab", "services")),
        reason="tests/jupyterlab_client/node_modules is missing: run setup.sh (or npm ci there)",
    ),
]

FRAMINGS = ["json", "v1"]
#: How the daemon logs each framing (sagecell_tw.web.websocket, event ws_connect).
SERVER_FRAMING = {"json": "default", "v1": "v1"}


@pytest.fixture(scope="module")
def runs(daemon):
    """framing -> {step: what the client saw}, each framing run once per module."""
    cache: dict[str, dict] = {}

    def run(framing: str) -> dict:
        if framing not in cache:
            try:
                proc = subprocess.run(
                    [NODE, "run.mjs", daemon.url, framing],
                    cwd=CLIENT_DIR,
                    capture_output=True,
                    text=True,
                    timeout=RUN_TIMEOUT,
                )
            except subprocess.TimeoutExpired as e:
                pytest.fail(f"run.mjs {framing} took over {RUN_TIMEOUT} s:\n{e.stdout}\n{e.stderr}")
            steps = {}
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    record = json.loads(line)
                    steps[record.pop("step")] = record
            failed = {name: s["failed"] for name, s in steps.items() if "failed" in s}
            assert proc.returncode == 0 and not failed, (proc.returncode, failed, proc.stdout, proc.stderr[-3000:])
            cache[framing] = steps
        return cache[framing]

    return run


@pytest.mark.parametrize("framing", FRAMINGS)
def test_framing_is_the_one_asked_for(runs, daemon, framing):
    steps = runs(framing)
    kid = steps["connect"]["kernel_id"]
    wire = steps["wire"]
    if framing == "v1":
        assert set(wire["protocols"]) == {"v1.kernel.websocket.jupyter.org"}
        assert wire["sent"]["text"] == 0 and wire["received"]["text"] == 0
        assert wire["sent"]["binary"] > 0 and wire["received"]["binary"] > 0
    else:
        # Text frames, but for messages with buffers (only the comm step has any): binary frames then
        binary = steps["comm"]["binary"]
        assert set(wire["protocols"]) == {""}
        assert wire["sent"]["binary"] == binary["sent"] == 1 and wire["received"]["binary"] == binary["received"] == 2
        assert wire["sent"]["text"] > 0 and wire["received"]["text"] > 0
    # The server's side: every socket of this session (one, and one more after
    # the restart) was opened in that framing.
    seen = re.findall(rf"a browser connected to session {kid} \((\w+) framing\)", daemon.log())
    assert seen == [SERVER_FRAMING[framing]] * len(wire["protocols"]), seen


@pytest.mark.parametrize("framing", FRAMINGS)
def test_connect_through_a_session(runs, framing):
    connect = runs(framing)["connect"]
    assert connect["default_spec"] == "python3" and connect["display_name"] == "Python 3 (ipykernel)"
    assert connect["implementation"] == "ipython" and connect["language"] == "python"


@pytest.mark.parametrize("framing", FRAMINGS)
def test_execute_streams_output(runs, framing):
    execute = runs(framing)["execute"]
    assert execute["status"] == "ok"
    assert execute["stdout"] == "line 0\nline 1\nline 2\n"
    assert execute["result"] == "42"
    assert execute["states"][0] == "busy" and execute["states"][-1] == "idle"


@pytest.mark.parametrize("framing", FRAMINGS)
def test_error_has_ename_and_traceback(runs, framing):
    error = runs(framing)["error"]
    assert error["status"] == "error" and error["reply_ename"] == "ZeroDivisionError"
    assert error["error"]["ename"] == "ZeroDivisionError"
    assert error["error"]["evalue"] == "division by zero"
    assert any("ZeroDivisionError" in line for line in error["error"]["traceback"])


@pytest.mark.parametrize("framing", FRAMINGS)
def test_input_over_stdin(runs, framing):
    answer = runs(framing)["input"]
    assert answer["status"] == "ok"
    assert answer["prompt"] == "name? "
    assert answer["stdout"] == "hello world\n"


@pytest.mark.parametrize("framing", FRAMINGS)
def test_display_html(runs, framing):
    display = runs(framing)["display"]
    assert display["status"] == "ok"
    assert [d["text/html"] for d in display["displays"]] == ["<b>bold</b> move"]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_interrupt_sleep_within_a_second(runs, framing):
    interrupt = runs(framing)["interrupt"]
    assert interrupt["status"] == "error" and interrupt["reply_ename"] == "KeyboardInterrupt"
    assert interrupt["error"]["ename"] == "KeyboardInterrupt"
    assert interrupt["reply_after_interrupt_s"] < 1.0, interrupt


@pytest.mark.parametrize("framing", FRAMINGS)
def test_restart_gives_a_fresh_namespace(runs, framing):
    steps = runs(framing)
    restart = steps["restart"]
    assert restart["kernel_id"] == steps["connect"]["kernel_id"]
    assert restart["before"] == "True\n"
    assert restart["after"] == "False\n" and restart["after_status"] == "ok"
    assert restart["other_after"] == "False\n"  # a second connection to it sees the same fresh kernel


@pytest.mark.parametrize("framing", FRAMINGS)
def test_restart_is_not_taken_for_a_crash(runs, framing):
    """
    The library reports 'autorestarting' (and JupyterLab then says "The kernel
    appears to have died. It will restart automatically.") when the server
    sends status 'restarting', which Jupyter Server does only for its own
    auto-restarts, never for a restart a client asked for.
    """
    restart = runs(framing)["restart"]
    restarter, other = restart["restarter"], restart["other"]
    assert restarter["statuses"][0] == "restarting"  # the library's own, as it asks
    assert "idle" in restarter["statuses"]
    for seen in (restarter, other):
        assert "restarting" not in seen["received"], seen
        assert "autorestarting" not in seen["statuses"], seen
    # The second connection hears the new kernel start; it does not reconnect.
    assert other["received"][:2] == ["starting", "idle"], other


@pytest.mark.parametrize("framing", FRAMINGS)
def test_shutdown_removes_the_kernel(runs, daemon, framing):
    shutdown = runs(framing)["shutdown"]
    kid = shutdown["kernel_id"]
    assert shutdown["kernel_status"] == "dead"
    # The kernel and its notebook session are gone, for the library and for anyone.
    assert shutdown["kernel_answer"] == 404 and shutdown["session_answer"] == 404
    status, _, _ = daemon.request("GET", f"/api/kernels/{kid}")
    assert status == 404


@pytest.mark.parametrize("framing", FRAMINGS)
def test_refused_listings_leave_the_kernel_working(runs, framing):
    """
    Anonymous callers get 403 for GET /api/kernels and /api/sessions (no
    visitor may list another's kernels). The library's managers poll those:
    a failed poll is retried later and leaves the kernels alone, so the
    managers are ready and the kernel keeps running code.
    """
    poll = runs(framing)["poll"]
    assert poll["kernels_listing"] == 403 and poll["sessions_listing"] == 403
    assert poll["kernel_manager_ready"] and poll["session_manager_ready"]
    assert not poll["kernel_disposed"] and poll["kernel_status"] != "dead"
    assert poll["status"] == "ok" and poll["stdout"] == "still here\n"


@pytest.mark.parametrize("framing", FRAMINGS)
def test_comms_both_ways_with_buffers_and_a_widget(runs, framing):
    comm = runs(framing)["comm"]
    assert comm["status"] == "ok"
    assert comm["opened"] == {"target": "sagecell.node", "data": {"hello": "node"}, "buffers": [[0, 1, 254, 255]]}
    assert comm["echo"] == {"data": {"echo": {"ping": 2}}, "buffers": [[250, 3, 2, 1]]}
    assert comm["answer"] == {"opened_with": {"x": 1}}
    widget = comm["widget"]
    assert widget["model"] == "IntSliderModel" and widget["value"] == 3 and widget["shown"]
    assert widget["stdout"] == "value 7\n"
    assert {"method": "echo_update", "state": {"value": 7}, "buffer_paths": []} in widget["echoes"]
