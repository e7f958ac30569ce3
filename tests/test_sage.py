"""
Sage kernels, for real: a daemon serving ``sagemath`` (the default) and
``python3`` kernels, each forked from its own warm master (sage_kernel.py).

The Sage tests skip where passagemath is not installed (``./setup.sh
--python-only``); there, what a Python-only server offers is tested instead.
"""

from __future__ import annotations

import base64
import os
import re
import time

import pytest
from support import Client, Daemon, descendants, msg
from test_cgroup import writable_memory_cgroup

from sagecell_tw import config as configmod

SAGE = configmod.sage_available()
needs_sage = pytest.mark.skipif(not SAGE, reason="passagemath is not installed (./setup.sh --python-only)")

#: the per-execution wall-clock limit of this module's daemon
EXEC_TIMEOUT = 8
#: a factorisation that runs for hours: a product of two ~200-bit primes
LONG_FACTOR = "factor(next_prime(2^200) * next_prime(2^210))"
#: an integral Maxima works on for minutes
LONG_INTEGRAL = "integrate(sin(x)^7 * exp(x^3) / (1 + log(x)^2), x)"
#: a GAP loop of 10^10 turns
LONG_GAP = "First([1..10^10], i -> i < 0)"


@pytest.fixture(scope="module")
def daemon():
    if not SAGE:
        pytest.skip("passagemath is not installed (./setup.sh --python-only)")
    d = Daemon(kernels="sagemath,python3", pool_size=2, exec_timeout=EXEC_TIMEOUT, max_kernels_per_client=32)
    d.start(timeout=120)
    try:
        wait_sage_pool(d)
        yield d
    finally:
        d.stop()


def wait_sage_pool(d: Daemon, timeout: float = 180.0) -> None:
    """Until a Sage kernel is pooled: its master imports and warms up Sage first (seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body, _ = d.request("GET", "/healthz")
        if isinstance(body, dict) and body.get("pools", {}).get("sagemath"):
            return
        time.sleep(0.1)
    raise AssertionError("no Sage kernel became ready:\n" + d.log()[-5000:])


def new(d: Daemon, name: str | None = "sagemath") -> tuple[str, Client]:
    status, body, _ = d.request("POST", "/api/kernels", {} if name is None else {"name": name})
    assert status == 201, (status, body)
    d.created.append(body["id"])
    return body["id"], Client(d, body["id"])


def result(outputs: list[dict]) -> dict:
    """The data of the (last) execute_result or display_data."""
    shown = [m for m in outputs if m["msg_type"] in ("execute_result", "display_data")]
    assert shown, f"nothing shown: {[(m['msg_type'], m['content']) for m in outputs]}"
    return shown[-1]["content"]["data"]


def plain(c: Client, code: str, timeout: float = 30.0) -> str:
    reply, outputs = c.execute(code, timeout=timeout)
    assert reply["status"] == "ok", reply
    return result(outputs)["text/plain"]


# -- a server without Sage ---------------------------------------------------------


def test_sagemath_without_passagemath_is_a_clear_error_at_start(monkeypatch):
    monkeypatch.setattr(configmod, "sage_available", lambda: False)
    with pytest.raises(configmod.ConfigError, match="sagemath needs passagemath"):
        configmod.build({}, {"kernels": "sagemath,python3"})
    assert configmod.build({}, {}).kernel_names() == ("python3",)
    monkeypatch.setattr(configmod, "sage_available", lambda: True)
    assert configmod.build({}, {}).kernel_names() == ("sagemath", "python3")
    assert configmod.build({}, {"kernels": "python3"}).kernel_names() == ("python3",)


@pytest.mark.slow
@pytest.mark.skipif(SAGE, reason="passagemath is installed: this is the Python-only server's test")
def test_python_only_server_offers_python_and_refuses_sage():
    d = Daemon(kernels=None).start()
    try:
        status, body, _ = d.request("GET", "/api/kernelspecs")
        assert status == 200 and body["default"] == "python3" and list(body["kernelspecs"]) == ["python3"]
        status, body, _ = d.request("POST", "/api/kernels", {"name": "sagemath"})
        assert status == 404 and "python3" in body["message"]
        status, body, _ = d.request("POST", "/api/kernels", {})
        assert status == 201 and body["name"] == "python3"
    finally:
        d.stop()


# -- what Jupyter clients see -----------------------------------------------------


def test_kernelspecs_list_sage_as_the_default_beside_python(daemon):
    status, body, _ = daemon.request("GET", "/api/kernelspecs")
    assert status == 200
    assert body["default"] == "sagemath"
    assert set(body["kernelspecs"]) == {"sagemath", "python3"}
    sage = body["kernelspecs"]["sagemath"]["spec"]
    assert sage["language"] == "sage" and sage["display_name"].startswith("passagemath 10.8")
    status, one, _ = daemon.request("GET", "/api/kernelspecs/sagemath")
    assert status == 200 and one["name"] == "sagemath"


@pytest.mark.parametrize("asked, got", [(None, "sagemath"), ("sage", "sagemath"), ("python", "python3")])
def test_new_kernels_are_sage_unless_asked_otherwise(daemon, asked, got):
    status, body, _ = daemon.request("POST", "/api/kernels", {} if asked is None else {"name": asked})
    assert status == 201 and body["name"] == got
    daemon.request("DELETE", f"/api/kernels/{body['id']}")


def test_sagemathcell_endpoints_run_sage(daemon):
    status, body, _ = daemon.request(
        "POST", "/service", raw=b"code=print(2%5E10)", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 200, body
    assert body["success"] is True and body["stdout"].strip() == "1024"


# -- Sage in the cell ---------------------------------------------------------------


def test_preparser(daemon):
    _, c = new(daemon)
    assert plain(c, "2^10") == "1024"
    assert plain(c, "type(2^10)") == "<class 'sage.rings.integer.Integer'>"
    assert plain(c, "1/2 + 1/3") == "5/6"
    assert plain(c, "f(x) = x^2\nf(3)") == "9"


def test_python_kernel_beside_sage_has_no_preparser(daemon):
    _, sage = new(daemon)
    _, python = new(daemon, "python3")
    assert plain(sage, "2^10") == "1024"
    assert plain(python, "2^10") == "8"  # Python's XOR
    assert plain(python, "1/2") == "0.5"
    reply, _ = python.execute("var('x')")
    assert reply["status"] == "error" and reply["ename"] == "NameError"


def test_factor_integrate_and_linear_algebra(daemon):
    _, c = new(daemon)
    assert plain(c, "factor(2^64 - 1)") == "3 * 5 * 17 * 257 * 641 * 65537 * 6700417"
    assert plain(c, "integrate(sin(x)^2, x)") == "1/2*x - 1/4*sin(2*x)"
    assert plain(c, "matrix(QQ, [[1, 2], [3, 4]]).det()") == "-2"


def test_plot_shows_as_a_png_image(daemon):
    _, c = new(daemon)
    reply, outputs = c.execute("plot(sin(x), (x, 0, pi))")
    assert reply["status"] == "ok"
    png = base64.b64decode(result(outputs)["image/png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_show_typesets(daemon):
    _, c = new(daemon)
    reply, outputs = c.execute("show(sqrt(x) / 2)")
    assert reply["status"] == "ok"
    data = result(outputs)
    assert "\\frac{1}{2}" in data["text/html"] and "\\sqrt{x}" in data["text/html"]
    assert "\\sqrt{x}" in data["text/latex"]


def test_gp_magic_and_interface(daemon):
    _, c = new(daemon)
    assert plain(c, "%gp 2 + 2") == "4"
    assert plain(c, "gp('factor(1001)')") == "[7, 1; 11, 1; 13, 1]"
    assert plain(c, "%maxima integrate(x^3, x)") == "x^4/4"


def test_gap_magic_interface_and_libgap_start_fast(daemon):
    """From the master's saved workspaces: GAP loads its state instead of building it (~1.5 s, or a failure)."""
    _, c = new(daemon)
    started = time.monotonic()
    assert plain(c, "gap('SymmetricGroup(5)').Size()") == "120"
    first_gap = time.monotonic() - started
    assert plain(c, "%gap Factors(1001)") == "[ 7, 11, 13 ]"
    started = time.monotonic()
    assert plain(c, "libgap.SymmetricGroup(6).Size()") == "720"
    first_libgap = time.monotonic() - started
    assert first_gap < 2 and first_libgap < 2, (first_gap, first_libgap)
    reply, _ = c.execute("open('/tmp/.kernel/sage/gap/mine', 'w')")  # the master's, shared: read-only
    assert reply["status"] == "error" and "Read-only file system" in reply["evalue"], reply


# -- limits hold for Sage -------------------------------------------------------------


def test_interrupt_stops_a_long_factorisation(daemon):
    kid, c = new(daemon)
    req = c.start_execute(LONG_FACTOR)
    time.sleep(1.5)
    started = time.monotonic()
    status, _, _ = daemon.request("POST", f"/api/kernels/{kid}/interrupt")
    assert status == 204
    reply, _ = c.outcome(req, timeout=10)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert time.monotonic() - started < 3
    assert plain(c, "factor(2^64 - 1)") == "3 * 5 * 17 * 257 * 641 * 65537 * 6700417"  # the same kernel goes on


def test_interrupt_request_on_the_websocket_stops_a_long_factorisation(daemon):
    """As clients that interrupt on the control channel do, not through REST."""
    _, c = new(daemon)
    req = c.start_execute(LONG_FACTOR)
    time.sleep(1.5)
    started = time.monotonic()
    c.send(msg("interrupt_request", {}, channel="control"))
    reply, _ = c.outcome(req, timeout=15)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert time.monotonic() - started < 3
    assert plain(c, "factor(2^64 - 1)") == "3 * 5 * 17 * 257 * 641 * 65537 * 6700417"


def test_time_limit_ends_a_long_integral(daemon):
    _, c = new(daemon)
    started = time.monotonic()
    reply, outputs = c.execute(LONG_INTEGRAL, timeout=EXEC_TIMEOUT + 30)
    took = time.monotonic() - started
    # Interrupted (not restarted: that would be status "dead"), once over the
    # limit; the traceback of Maxima's deep stack takes a second or two to
    # format, several on a loaded machine, and the integral alone runs for minutes.
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert EXEC_TIMEOUT - 1 < took < EXEC_TIMEOUT + 12
    assert "longer than the limit" in "".join(
        m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream"
    )
    assert plain(c, "integrate(x^2, x)") == "1/3*x^3"  # Maxima still works in this kernel


def test_memory_bomb_is_contained_and_normal_work_goes_on(daemon):
    _, c = new(daemon)
    reply, _ = c.execute("bomb = [0] * 10^10")
    assert reply["status"] == "error" and reply["ename"] == "MemoryError", reply
    reply, _ = c.execute("m = matrix(ZZ, 10^5, 10^5)")
    assert reply["status"] == "error" and reply["ename"] in ("MemoryError", "RuntimeError"), reply
    reply, _ = c.execute("big = 2^(2^36)")
    assert reply["status"] == "error" and reply["ename"] in ("MemoryError", "OverflowError", "RuntimeError"), reply
    assert plain(c, "factor(2^64 - 1)") == "3 * 5 * 17 * 257 * 641 * 65537 * 6700417"
    reply, outputs = c.execute("plot(sin(x), (x, 0, pi))")
    assert reply["status"] == "ok" and "image/png" in result(outputs)


@pytest.mark.skipif(writable_memory_cgroup() is None, reason="needs root and a writable memory cgroup")
def test_real_memory_over_the_limit_ends_the_kernel_with_a_clear_notice(daemon):
    """
    1.2 GB of real pages in two steps, each well under any single-allocation
    check: the kernel's memory cgroup (1 GiB, the configured limit) ends it,
    the session hears why, and goes on with a new kernel.
    """
    kid, c = new(daemon)
    pid = daemon.kernel_pid(kid)
    with open(f"/proc/{pid}/cgroup") as f:
        assert re.search(r"memory:/.*/sagecell-\d+/[0-9a-f]{32}$", f.read(), re.M)  # its own
    reply, outputs = c.execute("a = b'x' * int(6e8); b = b'y' * int(6e8)", timeout=60)
    said = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
    assert reply["status"] == "dead", reply
    assert "ran out of memory (its limit is 1024 MiB)" in said, said
    assert plain(c, "factor(2^64 - 1)") == "3 * 5 * 17 * 257 * 641 * 65537 * 6700417"  # a new kernel
    _, other = new(daemon)
    assert plain(other, "integrate(x^2, x)") == "1/3*x^3"
    assert "memory cgroup" not in daemon.log()  # no note of one missing


def test_interrupt_stops_libgap_and_the_time_limit_stops_gap(daemon):
    kid, c = new(daemon)
    req = c.start_execute(f"libgap.eval('{LONG_GAP}')")
    time.sleep(1.5)
    started = time.monotonic()
    status, _, _ = daemon.request("POST", f"/api/kernels/{kid}/interrupt")
    assert status == 204
    reply, _ = c.outcome(req, timeout=10)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert time.monotonic() - started < 3
    started = time.monotonic()
    reply, _ = c.execute(f"gap.eval('{LONG_GAP};')", timeout=EXEC_TIMEOUT + 15)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert EXEC_TIMEOUT - 1 < time.monotonic() - started < EXEC_TIMEOUT + 6
    # The GAP that was quit ends at once, not after Sage's 5 s between signals.
    pid = daemon.kernel_pid(kid)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and running(pid, "gap"):
        time.sleep(0.1)
    assert not running(pid, "gap")
    assert plain(c, "gap('1 + 1')") == "2" and plain(c, "libgap(2) + libgap(3)") == "5"


def running(pid: int, name: str) -> list[int]:
    """The processes under ``pid`` named ``name``, zombies left out."""
    found = []
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)
        except OSError:
            continue
        if fields[0].endswith("(" + name) and fields[1].split()[0] != "Z":
            found.append(p)
    return found


def test_pexpect_subprocesses_stay_in_the_kernels_limits_and_die_with_it(daemon):
    kid, c = new(daemon)
    for program in ("gp", "gap", "maxima", "singular"):
        assert plain(c, f"{program}('1 + 1')") == "2"
    pid = daemon.kernel_pid(kid)
    under = [p for p in descendants(pid) if p != pid]
    names = {comm(p) for p in under}
    assert {"gp", "gap", "Singular"} <= names and any(n.startswith("maxima") or n == "sbcl" for n in names), names
    limits = {p: memory_cgroup_and_limit(p) for p in [pid, *under]}
    assert len(set(limits.values())) == 1, limits  # one memory cgroup, one address-space limit: the kernel's
    status, _, _ = daemon.request("DELETE", f"/api/kernels/{kid}")
    assert status == 204
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in under):
        time.sleep(0.05)
    assert not [p for p in under if os.path.exists(f"/proc/{p}")]


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def memory_cgroup_and_limit(pid: int) -> tuple[str, str]:
    """Process ``pid``'s memory cgroup and its address-space rlimit."""
    with open(f"/proc/{pid}/cgroup") as f:
        group = next((line.split(":", 2)[2].strip() for line in f if ":memory:" in line), "")
    with open(f"/proc/{pid}/limits") as f:
        limit = next((line.split()[4] for line in f if line.startswith("Max address space")), "")
    return group, limit


def test_the_sage_master_has_no_thread_to_lose_at_fork(daemon):
    """
    A fork copies only the forking thread: the Sage master must have no other
    (OpenBLAS's pool, ECL's Boehm GC markers) when it forks a kernel.
    """
    masters = [p for p in sage_processes() if not in_own_pid_namespace(p)]
    assert masters, "no Sage master found"
    for pid in masters:
        threads = os.listdir(f"/proc/{pid}/task")
        names = [open(f"/proc/{pid}/task/{t}/comm").read().strip() for t in threads]
        assert len(threads) == 1, f"the Sage master {pid} has threads {names}"


def sage_processes() -> list[int]:
    """Processes with ECL (Sage's Lisp, for Maxima) loaded."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/maps") as f:
                    if "libecl" in f.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


def in_own_pid_namespace(pid: int) -> bool:
    """A kernel: PID 1 of a PID namespace of its own (kernel_child)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    except OSError:
        return True
