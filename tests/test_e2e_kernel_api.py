"""End to end: the Jupyter kernel API of a real daemon with real forked kernels."""

import time

import pytest
from support import Client, msg, stdout_of


def only_kernel(daemon) -> str:
    """A new kernel, the others of this module shut down first (they count towards the per-client limit)."""
    for kid in daemon.created:
        daemon.request("DELETE", f"/api/kernels/{kid}")
    return daemon.new_kernel()


def test_execute_streams_output(daemon):
    kid = daemon.new_kernel()
    c = Client(daemon, kid)
    reply, outputs = c.execute("for i in range(3): print('line', i)\n6*7")
    assert reply["status"] == "ok"
    assert stdout_of(outputs) == "line 0\nline 1\nline 2\n"
    results = [m for m in outputs if m["msg_type"] == "execute_result"]
    assert results[0]["content"]["data"]["text/plain"] == "42"
    states = [m["content"]["execution_state"] for m in outputs if m["msg_type"] == "status"]
    assert states[0] == "busy" and states[-1] == "idle"
    c.close()


def test_error_has_traceback(daemon):
    c = Client(daemon, daemon.new_kernel())
    reply, outputs = c.execute("1/0")
    assert reply["status"] == "error" and reply["ename"] == "ZeroDivisionError"
    err = [m for m in outputs if m["msg_type"] == "error"][0]
    assert any("ZeroDivisionError" in line for line in err["content"]["traceback"])


def test_input_over_stdin(daemon):
    c = Client(daemon, daemon.new_kernel())
    reply, outputs = c.execute("x = input('name? ')\nprint('hello', x)", allow_stdin=True, stdin_reply="world")
    assert reply["status"] == "ok"
    assert "hello world" in stdout_of(outputs)


def test_sessions_do_not_share_kernels_or_output(daemon):
    a, b = daemon.new_kernel(), daemon.new_kernel()
    ca, cb = Client(daemon, a), Client(daemon, b)
    ca.execute("secret = 'a'")
    reply, outputs = cb.execute("print('secret' in dir())")
    assert stdout_of(outputs) == "False\n"
    assert daemon.kernel_pid(a) != daemon.kernel_pid(b)


@pytest.mark.parametrize(
    ("code", "ename"),
    # A cell that awaits is cancelled (ipykernel's way), the others interrupted.
    [("time.sleep(30)", "KeyboardInterrupt"), ("await asyncio.sleep(30)", "CancelledError")],
)
def test_interrupt_sleep_within_a_second(daemon, code, ename):
    kid = only_kernel(daemon)
    c = Client(daemon, kid)
    c.execute("import asyncio, time")
    req = c.send(msg("execute_request", {"code": code, "silent": False}))
    # wait for busy
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = c.recv(10)
        if m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == req["header"]["msg_id"]:
            break
    time.sleep(0.3)  # let the code reach time.sleep, as a person would
    t0 = time.monotonic()
    status, _, _ = daemon.request("POST", f"/api/kernels/{kid}/interrupt")
    assert status == 204
    while time.monotonic() - t0 < 5:
        m = c.recv(5)
        if m["msg_type"] == "execute_reply":
            break
    assert m["msg_type"] == "execute_reply" and m["content"]["status"] == "error"
    assert m["content"]["ename"] == ename
    assert time.monotonic() - t0 < 1.0


def test_restart_gives_fresh_kernel_same_id(daemon):
    kid = daemon.new_kernel()
    c = Client(daemon, kid)
    c.execute("marker = 1")
    status, body, _ = daemon.request("POST", f"/api/kernels/{kid}/restart")
    assert status == 200 and body["id"] == kid
    reply, outputs = c.execute("print('marker' in dir())")
    assert stdout_of(outputs) == "False\n"


def test_delete_shuts_kernel_down(daemon):
    kid = daemon.new_kernel()
    c = Client(daemon, kid)
    c.execute("1")
    pid = daemon.kernel_pid(kid)
    status, _, _ = daemon.request("DELETE", f"/api/kernels/{kid}")
    assert status == 204
    status, body, _ = daemon.request("GET", f"/api/kernels/{kid}")
    assert status == 404 and "message" in body
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("kernel process still alive after DELETE")


def test_killed_kernel_reports_dead(daemon):
    import os
    import signal

    kid = daemon.new_kernel()
    c = Client(daemon, kid)
    c.execute("1")
    os.kill(daemon.kernel_pid(kid), signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        m = c.recv(5)
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "dead":
            break
    assert m["content"]["execution_state"] == "dead"
    assert time.monotonic() - t0 < 1.0
    _, body, _ = daemon.request("GET", f"/api/kernels/{kid}")
    assert body["execution_state"] == "dead"


def test_the_shell_is_the_kernels_own(daemon):
    """
    The master made the shell (ipython_kernel._make_master_shell); in each
    kernel it knows that kernel's dirs, its ``__main__`` and its kernel.
    """
    c = Client(daemon, only_kernel(daemon))
    code = "\n".join(
        [
            "import os, pickle, sys",
            "ip = get_ipython()",
            "class Point: pass",
            "here = os.getcwd()",
            "print(os.path.basename(here))",
            "print([str(d) for d in _dh] == [here], ip.starting_dir == here, os.environ['HOME'] == here)",
            # its own profile (in its private state dir), not the master's, nor in the visitor's files
            "print(ip.profile_dir.location.startswith(os.environ['IPYTHONDIR'] + '/') and not ip.profile_dir.location.startswith(here))",
            "print(type(pickle.loads(pickle.dumps(Point()))).__name__)",
            "print(ip.kernel is not None and ip.parent is ip.kernel, os.environ.get('PAGER'))",
        ]
    )
    reply, outputs = c.execute(code)
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs) == "work\nTrue True True\nTrue\nPoint\nTrue cat\n"
    reply, outputs = c.execute("%cd /\n%cd -\nsaved = 42\n%store saved")
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs).endswith("/work\nStored 'saved' (int)\n")


def test_top_level_await_and_long_cells(daemon):
    """Cells that await still run as coroutines; long cells without it run as they are."""
    c = Client(daemon, only_kernel(daemon))
    reply, outputs = c.execute("import asyncio\nawait asyncio.sleep(0)\nprint('awaited', asyncio.get_running_loop() is not None)")
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs) == "awaited True\n"
    reply, outputs = c.execute("async def agen():\n    yield 1\n[i async for i in agen()]")
    assert reply["status"] == "ok", reply
    assert [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"] == ["[1]"]
    long_cell = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(300)) + "print(f299(1))"
    reply, outputs = c.execute(long_cell)
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs) == "300\n"


def test_a_plot_shows_inline_at_the_end_of_its_cell(daemon):
    """The inline backend's hook is the master shell's (ipython_kernel._make_master_shell): no plt.show() needed."""
    c = Client(daemon, only_kernel(daemon))
    reply, outputs = c.execute("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9]);")
    assert reply["status"] == "ok", reply
    images = [m for m in outputs if m["msg_type"] == "display_data" and "image/png" in m["content"]["data"]]
    assert len(images) == 1
    reply, outputs = c.execute("1")  # and the figure is not shown again
    assert not [m for m in outputs if m["msg_type"] == "display_data"]
