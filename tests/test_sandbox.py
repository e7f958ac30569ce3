"""
The kernel's own walls, attacked from inside real kernels of a real daemon:
where it may write (and what the disk quota counts), what of the host's
devices and network devices it sees, and whether it starts a debugger.

Like tests/test_security.py (whose daemons, sessions and attack prelude these
reuse), everything runs against a daemon started as root (kernels drop to the
worker account) and one started as an ordinary account; the quota here is
small (20 MiB) and the file size limit large, so the quota is what must stop
a kernel that writes much.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from support import ROOT, msg, stdout_of
from test_security import VARIANTS, Session, assert_contained, attacked, died

from sagecell_tw.kernel import sandbox

pytestmark = pytest.mark.slow

QUOTA = 20 << 20
#: what the attacks try to write: well over the quota
FLOOD = 72 << 20
#: the only entries a kernel's /dev may have
SAFE_DEV = {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd", "stdin", "stdout", "stderr"}


@pytest.fixture(scope="module", params=VARIANTS)
def env(request):
    # A cell may run 10 s: long enough for the quota check (each second) to
    # end a kernel however loaded the machine, before the time limit would.
    with attacked(request.param, disk_quota="20M", file_size="100M", exec_timeout=10) as e:
        yield e


def host_disks() -> list[str]:
    """This machine's block devices, as /dev names (vda, sda, nvme0n1, loop0, zram0, ...)."""
    return sorted(name for name in os.listdir("/sys/block") if os.path.exists(f"/dev/{name}"))


def quota_notice(outputs: list[dict]) -> bool:
    text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
    return bool(re.search(r"\[sagecell\].*quota", text))


# -- where a kernel may write -----------------------------------------------------------


def test_writes_nowhere_in_its_own_dir_but_its_work_dir(env):
    """
    Its ipc dir (sockets, log) and its kernel dir (records) are not the
    visitor's to write: no regular file, no log by path, no record changed.
    """
    with Session(env) as k:
        results = k.attack(
            f"""
def create(path, size):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        chunk = b"\\0" * (1 << 20)
        for _ in range(size >> 20):
            os.write(fd, chunk)
    finally:
        os.close(fd)
    return "wrote %d bytes in %s" % (size, path)
def append(path):
    with open(path, "ab") as f:
        f.write(b"x" * 4096)
    return "appended to " + path
control("write in my work dir", lambda: create("work-file", 1 << 20))
control("write in my /tmp", lambda: create("/tmp/tmp-file", 1 << 20))
for i in range(4):
    attempt("create ../ipc/fill-%d" % i, lambda i=i: create("../ipc/fill-%d" % i, {FLOOD} // 4))
    attempt("create ../fill-%d" % i, lambda i=i: create("../fill-%d" % i, {FLOOD} // 4))
attempt("append to ../ipc/kernel.log by path", lambda: append("../ipc/kernel.log"))
attempt("rewrite ../pid", lambda: append("../pid"))
attempt("make a dir in ../ipc", lambda: os.mkdir("../ipc/d"))
attempt("make a fifo in ../ipc", lambda: os.mkfifo("../ipc/f"))
attempt("bind a socket in ../ipc", lambda: socket.socket(socket.AF_UNIX).bind("../ipc/s"))
attempt("remove an ipc socket", lambda: os.unlink("../ipc/k-1"))
attempt("rename an ipc socket", lambda: os.rename("../ipc/k-1", "../ipc/k-9"))
attempt("remove ../ipc/kernel.log", lambda: os.unlink("../ipc/kernel.log"))
"""
        )
        assert_contained(results)
        # It still answers: its sockets are where the daemon expects them.
        reply, out = k.run("print(6 * 7)")
        assert reply["status"] == "ok" and stdout_of(out) == "42\n", (reply, out)
    env.assert_serving("writing in its own dir")


def test_writing_through_its_log_counts_against_the_quota(env):
    """
    The kernel's stdout and stderr go to its log (ipc/kernel.log), opened
    before the sandbox: 72 MiB written through that file ends the kernel
    at its 20 MiB quota, saying why.
    """
    with Session(env) as k:
        code = f"""
import os
log = [fd for fd in map(int, os.listdir("/proc/self/fd")) if os.path.realpath("/proc/self/fd/%d" % fd).endswith("/kernel.log")]
print("log fds", log, flush=True)
chunk = b"\\0" * (1 << 20)
written = 0
for _ in range({FLOOD} >> 20):
    written += os.write(log[0], chunk)
print("wrote", written, flush=True)
import time
time.sleep(6)
print("still alive", flush=True)
"""
        reply, outputs = k.run(code, timeout=30)
        out = stdout_of(outputs)
        assert "log fds [" in out and "log fds []" not in out, f"the attack found no log fd: {reply} {out!r}"
        assert died(outputs) or reply.get("status") == "dead", (
            f"a kernel that wrote {FLOOD >> 20} MiB into its log lived on: {reply} {out!r}"
        )
        assert quota_notice(outputs), outputs
        assert "still alive" not in out
    env.assert_serving("writing into its log")


def test_a_deleted_file_held_open_counts_against_the_quota(env):
    """
    Open a file, delete it, write on: no directory scan sees it, yet it fills
    the disk. 72 MiB so written end the kernel at its 20 MiB quota.
    """
    with Session(env) as k:
        code = f"""
import os, time
fd = os.open("hidden", os.O_WRONLY | os.O_CREAT, 0o600)
os.unlink("hidden")
print("deleted", os.listdir("."), flush=True)
chunk = b"\\1" * (1 << 20)
written = 0
for _ in range({FLOOD} >> 20):
    written += os.write(fd, chunk)
print("wrote", written, os.listdir("."), flush=True)
time.sleep(6)
print("still alive", flush=True)
"""
        reply, outputs = k.run(code, timeout=30)
        out = stdout_of(outputs)
        # Ended while writing (the quota check came first) or after.
        assert "deleted []" in out, f"the attack broke: {reply} {out!r}"
        assert died(outputs) or reply.get("status") == "dead", (
            f"a kernel holding {FLOOD >> 20} MiB in a deleted file lived on: {out!r}"
        )
        assert quota_notice(outputs), outputs
        assert "still alive" not in out
    env.assert_serving("a deleted file held open")


def test_ipython_and_matplotlib_keep_their_files_out_of_the_work_dir(env):
    """A plot, %store and the IPython profile work; what they write is not in the visitor's files."""
    with Session(env) as k:
        reply, out = k.run(
            """
import os, matplotlib
matplotlib.use("module://matplotlib_inline.backend_inline")
import matplotlib.pyplot as plt
plt.plot([1, 2, 3]); plt.show()
x = 42
%store x
del x
%store -r x
print("restored", x)
ip = get_ipython()
print("profile", ip.profile_dir.location)
print("mpl", matplotlib.get_configdir())
print("work", sorted(os.listdir(".")))
""",
            timeout=30,
        )
        text = stdout_of(out)
        assert reply["status"] == "ok", (reply, text)
        assert any("image/png" in m["content"].get("data", {}) for m in out if m["msg_type"] == "display_data"), out
        assert "restored 42" in text, text
        profile = re.search(r"^profile (.*)$", text, re.M).group(1)
        mpl = re.search(r"^mpl (.*)$", text, re.M).group(1)
        listing = re.search(r"^work (.*)$", text, re.M).group(1)
        assert listing == "[]", f"IPython or matplotlib wrote into the visitor's work dir: {listing}"
        for path in (profile, mpl):
            assert "/work" not in path and "/ipc" not in path, path
    env.assert_serving("plots and %store")


# -- devices and network devices -------------------------------------------------------


def test_sys_class_net_shows_only_its_own_loopback(env):
    with Session(env) as k:
        reply, out = k.run("import os; print(sorted(os.listdir('/sys/class/net')))")
        assert reply["status"] == "ok", reply
        assert stdout_of(out).strip() == "['lo']", f"host network devices visible: {stdout_of(out)}"
        host = [n for n in os.listdir("/sys/class/net") if n != "lo"]
        results = k.attack(
            f"""
for name in {host!r}:
    attempt("find host device " + name, lambda n=name: read("/sys/class/net/%s/address" % n))
"""
        )
        assert_contained(results)


def test_dev_has_only_the_safe_devices(env):
    disks = host_disks()
    assert disks, "this machine shows no block device to look for"
    with Session(env) as k:
        results = k.attack(
            f"""
control("write /dev/null", lambda: open("/dev/null", "w").write("x"))
control("read /dev/urandom", lambda: len(read("/dev/urandom")))
control("read /dev/zero", lambda: len(read("/dev/zero")))
control("a pty", lambda: os.ttyname(os.openpty()[1]))
control("write in /dev/shm", lambda: open("/dev/shm/x", "w").write("x"))
control("a subprocess", lambda: subprocess.run(["true"], check=True).returncode)
extra = sorted(set(os.listdir("/dev")) - set({sorted(SAFE_DEV)!r}))
_results["other entries in /dev"] = ("SUCCEEDED: " + repr(extra)) if extra else "blocked: none"
for name in {disks!r}:
    attempt("stat host disk /dev/" + name, lambda n=name: os.stat("/dev/" + n))
    attempt("open host disk /dev/" + name, lambda n=name: read("/dev/" + n))
attempt("create a file in /dev", lambda: open("/dev/new", "w"))
attempt("stat the host's /dev/console", lambda: os.stat("/dev/console"))
attempt("stat the host's /dev/kmsg", lambda: os.stat("/dev/kmsg"))
"""
        )
        assert_contained(results)
    env.assert_serving("looking at /dev")


# -- no debugger -----------------------------------------------------------------------


def control_reply(k: Session, request: dict, timeout: float = 10.0) -> dict | None:
    """The reply on the control channel to ``request``, or None in time."""
    mid = request["header"]["msg_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = k.client.recv(max(0.1, deadline - time.monotonic()))
        except Exception:
            return None
        if m.get("parent_header", {}).get("msg_id") == mid and m["channel"] == "control":
            return m
    return None


def test_debug_request_is_refused_and_starts_no_debugger(env):
    with Session(env) as k:
        reply, out = k.run("import threading; print(len(threading.enumerate()))")
        threads_before = int(stdout_of(out))
        sent = k.client.send(
            msg(
                "debug_request",
                {
                    "type": "request",
                    "seq": 1,
                    "command": "initialize",
                    "arguments": {"adapterID": "sagecell", "clientID": "x"},
                },
                channel="control",
            )
        )
        got = control_reply(k, sent)
        assert got is not None, "no reply to a debug_request"
        # Refused by the daemon (messages.ALLOWED), and by the kernel behind it.
        assert got["msg_type"] == "debug_reply" and got["content"].get("status") == "error", got
        # And no debugger came up: no debugpy thread, module at work, or process.
        sent = k.client.send(
            msg("debug_request", {"type": "request", "seq": 2, "command": "attach", "arguments": {}}, channel="control")
        )
        control_reply(k, sent)
        reply, out = k.run(
            """
import os, sys, threading
names = [t.name for t in threading.enumerate()]
procs = []
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            procs.append(open("/proc/%s/cmdline" % p, "rb").read().replace(b"\\0", b" ").decode())
        except OSError:
            pass
print(len(names), names)
print([c for c in procs if "debugpy" in c or "pydevd" in c])
print(bool(getattr(sys.modules.get("debugpy"), "is_client_connected", None) and sys.modules["debugpy"].is_client_connected()))
"""
        )
        lines = stdout_of(out).splitlines()
        assert reply["status"] == "ok", reply
        count, names = lines[0].split(" ", 1)
        assert int(count) == threads_before, f"threads appeared after debug_request: {names}"
        assert not re.search(r"pydevd|debugpy", names, re.I), names
        assert lines[1] == "[]", f"a debugger process runs: {lines[1]}"
        info = k.client.send(msg("kernel_info_request", {}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = k.client.recv(10)
            if m["msg_type"] == "kernel_info_reply" and m["parent_header"].get("msg_id") == info["header"]["msg_id"]:
                assert "debugger" not in m["content"].get("supported_features", []), m["content"]
                break
        else:
            pytest.fail("no kernel_info_reply")
    env.assert_serving("a debug_request")


# -- without namespaces: Landlock alone ---------------------------------------------------


#: the sandboxed child of test_without_namespaces_landlock_alone..., run in a fresh interpreter
LANDLOCK_ALONE = r"""
import errno, json, os, sys
from sagecell_tw.kernel import child as kernel_child

spec, host_tmp, disks = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
missing = kernel_child._enter_sandbox(spec, -1)
got = {}
for path in ("work-file", "../ipc/regular", "../regular", "../ipc/kernel.log", host_tmp,
             os.path.join(spec["state"], "f"), "/dev/null"):
    try:
        with open(path, "a") as f:
            f.write("x")
        got[path] = "written"
    except OSError as e:
        got[path] = errno.errorcode[e.errno]
for name in disks:
    try:
        os.close(os.open(f"/dev/{name}", os.O_RDONLY))
        got[name] = "opened"
    except OSError as e:
        got[name] = errno.errorcode[e.errno]
try:
    got["pty"] = os.ttyname(os.openpty()[1])
except OSError as e:
    got["pty"] = errno.errorcode[e.errno]
print(json.dumps({"missing": missing, "got": got, "state": spec["state"], "env": dict(os.environ)}))
"""


def test_without_namespaces_landlock_alone_keeps_writes_in_the_kernel_dir(tmp_path):
    """
    Where a kernel gets no namespaces (``--no-userns``, or a Linux without
    them), Landlock alone keeps it out of its ipc dir and kernel dir, and off
    the host's shared /tmp (its state goes to its kernel dir, counted by the
    quota, instead) and off the host's disks, even as root.
    """
    if sandbox.landlock_abi() < 1:
        pytest.skip("no Landlock in this Linux")
    kdir = tmp_path / "kernel"
    for sub in ("ipc", "work"):
        (kdir / sub).mkdir(parents=True)
    (kdir / "ipc" / "kernel.log").write_bytes(b"")
    spec = {
        "dir": str(kdir),
        "workdir": str(kdir / "work"),
        "private": str(kdir / "ipc"),
        "ipc_prefix": str(kdir / "ipc" / "k"),
        "limits": sandbox.Limits().as_json(),
        "userns": False,
    }
    host_tmp = f"/tmp/sagecell-landlock-{os.getpid()}"

    # A fresh interpreter, not a fork of this one: the test process may hold
    # threads (and their locks) from earlier tests, which a forked child
    # would inherit locked.
    try:
        done = subprocess.run(
            [sys.executable, "-c", LANDLOCK_ALONE, json.dumps(spec), host_tmp, json.dumps(host_disks())],
            capture_output=True,
            timeout=30,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        report = json.loads(done.stdout or b"{}")
    finally:
        if os.path.exists(host_tmp):
            os.unlink(host_tmp)
    assert report, ("the sandboxed child reported nothing", done.stderr[-3000:])
    got = report["got"]
    state = str(kdir / "state")
    assert report["state"] == state and report["env"]["IPYTHONDIR"].startswith(state + "/"), report
    assert got["work-file"] == "written" and got[os.path.join(state, "f")] == "written", got
    assert got["/dev/null"] == "written" and got["pty"].startswith("/dev/pts/"), got
    for path in ("../ipc/regular", "../regular", "../ipc/kernel.log", host_tmp, *host_disks()):
        assert got[path] == "EACCES", (path, got)
    assert sorted(os.listdir(kdir / "ipc")) == ["k-1", "k-2", "k-3", "k-4", "kernel.log"], "the ipc sockets are bound"
