"""
Attacks from inside real kernels, through the WebSocket API of a real daemon.

Each test runs attack code in a kernel the way an anonymous visitor would, and
states what must hold: every step is refused by the system (an ``OSError`` in
the kernel: "blocked"), the visitor sees a clear message where a limit hits,
and the daemon keeps serving another session promptly.

Everything runs twice: with the daemon started as root (kernels drop to the
worker account) and with the daemon started as an ordinary account (kernels run
as that same account, walled off only by their namespaces). Network use is
loopback and this machine's own addresses only; every loop in attack code is
bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from support import ROOT, Client, Daemon, descendants, found_in_memory, msg, scan_memory, stdout_of

from sagecell_tw import config as configmod
from sagecell_tw.kernel import sandbox

pytestmark = pytest.mark.slow

#: skips that running as root cannot avoid (conftest fails every other skip here when root):
#: a Python-only install has no Sage variant, and a system may have no setuid binary to try
SKIPS_ROOT_CANNOT_HELP = ("passagemath is not installed", "no setuid binary in the kernel's view")

AM_ROOT = os.geteuid() == 0
WORKER = "sagecell-worker"
#: the ordinary account the unprivileged daemon runs as (made when missing)
TEST_ACCOUNT = "sagecell-testuser"
EXEC_TIMEOUT = 3
DISK_QUOTA = 50 << 20
FILE_SIZE = 20 << 20
ADDRESS_SPACE = 1 << 30
PROCESSES = 64
#: "promptly", for the bystander session's 1+1 while or after an attack
PROMPT = 3.0

#: Loaded into every attack: a step is "blocked" when the system refuses it
#: with an OSError; anything else it raises means the attack code itself is
#: broken, which must fail the test rather than pass it.
PRELUDE = r"""
import ctypes, errno, json, os, re, signal, socket, subprocess, time
_results = {}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]

def _oserror():
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e))

def attempt(name, fn):
    try:
        got = fn()
    except OSError as e:
        _results[name] = "blocked: %s: %s" % (type(e).__name__, e)
    except BaseException as e:
        _results[name] = "BROKEN: %s: %s" % (type(e).__name__, e)
    else:
        _results[name] = "SUCCEEDED: " + repr(got)[:300]

def control(name, fn):
    attempt("control: " + name, fn)

def report():
    print("\n@@RESULTS@@" + json.dumps(_results))
    _results.clear()

def read(path):
    with open(path, "rb") as f:
        return f.read(200)

def ptrace_attach(pid):
    if _libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        raise _oserror()
    try:
        os.waitpid(pid, 0x40000000)  # __WALL
    except OSError:
        pass
    _libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
    return "attached to %d" % pid

def mount_tmpfs(target):
    os.makedirs(target, exist_ok=True)
    if _libc.mount(b"none", target.encode(), b"tmpfs", 0, None) != 0:
        raise _oserror()
    return "mounted " + target

def umount(target):
    if _libc.umount2(target.encode(), 2) != 0:  # MNT_DETACH
        raise _oserror()
    return "unmounted " + target

def unshare(flags):
    if _libc.unshare(flags) != 0:
        raise _oserror()
    return "unshared %#x" % flags

def listing(path):
    # A listing may show the way down to this kernel's own dir (the sandbox
    # rebuilds that path), and nothing else.
    names = os.listdir(path)
    mine = os.path.dirname(os.getcwd()) + "/"
    real = os.path.realpath(path)
    foreign = [n for n in names if not mine.startswith(os.path.join(real, n) + "/")]
    if foreign:
        return foreign
    raise OSError(errno.ENOENT, "shows only the way to my own dir: %r" % names)

def unix_connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)
    finally:
        s.close()
    return "connected to " + path

def tcp_connect(host, port):
    socket.create_connection((host, port), timeout=1).close()
    return "connected to %s:%d" % (host, port)

def bind_mount(source, target):
    os.makedirs(target, exist_ok=True)
    if _libc.mount(source.encode(), target.encode(), None, 4096 | 16384, None) != 0:  # MS_BIND | MS_REC
        raise _oserror()
    return "bound %s on %s" % (source, target)

def raise_limit(which):
    import resource
    try:
        resource.setrlimit(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except ValueError as e:  # Python's word for EPERM here
        raise OSError(errno.EPERM, str(e))
    return resource.getrlimit(which)

def status_field(name):
    with open("/proc/self/status") as f:
        return re.search(r"^%s:\s*(\S+)" % name, f.read(), re.M).group(1)

def in_child(fn):
    # Some steps need a single-threaded process (unshare of a user namespace): fork one.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            attempt("x", fn)
            os.write(w, _results["x"].encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return data.decode() or "BROKEN: the child reported nothing"
"""


# -- daemons ------------------------------------------------------------------------


class DaemonAs(Daemon):
    """A daemon started as an ordinary account: the unprivileged deployment."""

    def __init__(self, account: pwd.struct_passwd | None, *args, **kw):
        super().__init__(*args, **kw)
        self.account = account
        if account is not None:
            os.chown(self.tmp, account.pw_uid, account.pw_gid)
            self.env.update(HOME=self.tmp, USER=account.pw_name, LOGNAME=account.pw_name)
            self.env.pop("XDG_RUNTIME_DIR", None)

    def _start(self, timeout: float) -> Daemon:
        logf = open(self.log_path, "wb")
        who = {}
        if self.account is not None:
            who = dict(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[])
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "sagecell",
                *self.args,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=self.tmp,
            env=self.env,
            **who,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"Site (?:\(TLS\) )?starting on (\d+)", self.log())
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + self.log())
            time.sleep(0.05)
        else:
            raise RuntimeError("daemon did not start:\n" + self.log())
        self.wait_pool(1, timeout=deadline - time.monotonic())
        return self


def ordinary_account() -> pwd.struct_passwd | None:
    """The ordinary account for the unprivileged daemon, created once when we are root."""
    try:
        return pwd.getpwnam(TEST_ACCOUNT)
    except KeyError:
        pass
    if shutil.which("useradd") is None:
        return None
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_ACCOUNT],
        check=False,
        capture_output=True,
    )
    try:
        return pwd.getpwnam(TEST_ACCOUNT)
    except KeyError:
        return None


def local_addresses() -> list[str]:
    """This machine's own non-loopback addresses (``hostname -I``), never anything remote."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [a for a in out.split() if not a.startswith(("127.", "fe80:")) and a != "::1"]


def wait_pool_of(daemon: Daemon, name: str, timeout: float = 180.0) -> None:
    """Until a kernel named ``name`` is pooled (Sage's master takes seconds to import and warm up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body, _ = daemon.request("GET", "/healthz")
        if isinstance(body, dict) and body.get("pools", {}).get(name):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {name} kernel became ready:\n" + daemon.log()[-5000:])


class Env:
    """One daemon under attack, what the tests know about it from outside, and a bystander session."""

    def __init__(self, variant: str, daemon: Daemon, kernel_uid: int):
        self.variant = variant
        self.daemon = daemon
        self.kernel_uid = kernel_uid
        #: the kernels attacked, and where their spawner makes their dirs (spawners.spawner_argv)
        self.kernel_name = "sagemath" if variant == "sage" else "python3"
        self.base_dir = os.path.join(daemon.run_dir, "kernels" if variant != "sage" else "kernels-sagemath")
        self.bystander = Session(self)
        self.cleanup: list[str] = []

    @property
    def daemon_pid(self) -> int:
        return self.daemon.proc.pid

    def spawner_pids(self) -> list[int]:
        """The spawner front, the fork server's manager and its zygote (host pids), not kernels."""
        pids = [int(p) for p in re.findall(r"started spawner process (\d+)", self.daemon.log())]
        out = []
        for pid in pids[-1:]:
            out.append(pid)
            for child in descendants(pid)[1:]:
                try:
                    with open(f"/proc/{child}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    with open(f"/proc/{child}/cmdline", "rb") as f:
                        zygote = b"sagecell_tw.worker.zygote" in f.read()
                    with open(f"/proc/{pid}/stat") as f:
                        session = f.read().rsplit(")", 1)[1].split()[3]
                except (OSError, ValueError, IndexError):
                    continue
                # Kernels are forks of the zygote too, each in a session of its own.
                if int(fields[1]) == pid or (zygote and fields[3] == session):
                    out.append(child)
        return out

    def assert_serving(self, what: str) -> None:
        """Another session still gets 1+1 promptly."""
        t0 = time.monotonic()
        reply, outputs = self.bystander.client.execute("1+1", timeout=15)
        took = time.monotonic() - t0
        assert reply["status"] == "ok", f"after {what}: bystander got {reply}"
        result = [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"]
        assert result == ["2"], f"after {what}: bystander got {result}"
        assert took < PROMPT, f"after {what}: bystander's 1+1 took {took:.1f} s"
        assert self.daemon.proc.poll() is None, f"after {what}: the daemon exited"


class Session:
    """A session with its own kernel, ended (DELETE) when done."""

    def __init__(self, env: Env):
        self.env = env
        status, body, _ = env.daemon.request("POST", "/api/kernels", {"name": env.kernel_name})
        assert status == 201, (status, body)
        self.id = body["id"]
        env.daemon.created.append(self.id)
        self.client = Client(env.daemon, self.id)
        if env.kernel_name == "sagemath":
            # The attacks are Python: Sage's preparser off (2**30 stays a
            # Python int for ctypes); everything else is the Sage kernel's.
            reply, _ = self.client.execute("preparser(False)")
            assert reply["status"] == "ok", reply

    def run(self, code: str, timeout: float = 15.0):
        return self.client.execute(code, timeout=timeout)

    def attack(self, code: str, timeout: float = 15.0) -> dict:
        """Run attack code (PRELUDE loaded, ``report()`` appended); its results by step."""
        reply, outputs = self.run(PRELUDE + "\n" + code + "\nreport()\n", timeout)
        out = stdout_of(outputs)
        m = re.search(r"^@@RESULTS@@(.*)$", out, re.M)
        assert m, f"the attack did not report: {reply}\n{out}"
        return json.loads(m.group(1))

    def host_pids(self) -> list[int]:
        """The host pids of this session's kernel (outer process and everything under it)."""
        self.run("1")
        pids = descendants(self.env.daemon.kernel_pid(self.id))
        assert all(p > 1 for p in pids)
        return pids

    def end(self) -> None:
        try:
            self.client.close()
        finally:
            self.env.daemon.request("DELETE", f"/api/kernels/{self.id}")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.end()


def still_works(k: Session) -> None:
    """The kernel answers 1+1 (once more if ipykernel aborted the first try, as it does right after an error)."""
    for _ in range(2):
        reply, out = k.run("print(1+1)")
        if reply["status"] != "aborted":
            break
        time.sleep(0.3)
    assert reply["status"] == "ok" and stdout_of(out) == "2\n", (reply, stdout_of(out))


def breaches(results: dict) -> dict:
    """Steps that were not refused by the system (or whose code broke)."""
    return {k: v for k, v in results.items() if not k.startswith("control: ") and not v.startswith("blocked")}


def failed_controls(results: dict) -> dict:
    """Positive controls (what the kernel may do) that did not succeed: the attack would prove nothing."""
    return {k: v for k, v in results.items() if k.startswith("control: ") and not v.startswith("SUCCEEDED")}


def assert_contained(results: dict) -> None:
    # Shown with the failure (or always, under pytest -s): what each step got.
    print("\n".join(f"{k}: {v}" for k, v in results.items()))
    assert not failed_controls(results), f"controls failed, so the attack proves nothing: {failed_controls(results)}"
    assert not breaches(results), "not contained:\n" + "\n".join(f"  {k}: {v}" for k, v in breaches(results).items())


#: the deployments every attack runs against: "sage" is "root" serving Sage
#: kernels, each attack run in one (with Sage's preparser off: plain Python)
VARIANTS = [pytest.param("root", marks=pytest.mark.root), "unprivileged", pytest.param("sage", marks=pytest.mark.root)]


@contextlib.contextmanager
def attacked(variant: str, **overrides):
    """A daemon of ``variant`` ("root", "unprivileged" or "sage") to attack, stopped at the end; ``overrides`` its options."""
    options = dict(
        pool_size=3,
        exec_timeout=EXEC_TIMEOUT,
        disk_quota="50M",
        file_size="20M",
        address_space=ADDRESS_SPACE,
        processes=PROCESSES,
        max_kernels_per_client=32,
        preload="",
    )
    options.update(overrides)
    if variant == "sage":
        if not configmod.sage_available():
            pytest.skip("passagemath is not installed (./setup.sh --python-only)")
        options["kernels"] = "sagemath"
    if variant in ("root", "sage"):
        if not AM_ROOT:
            pytest.skip("the root variant needs root: the daemon drops kernels to the worker account")
        try:
            kernel_uid = pwd.getpwnam(WORKER).pw_uid
        except KeyError:
            pytest.skip(f"the worker account {WORKER} does not exist (setup.sh creates it)")
        daemon = DaemonAs(None, **options)
    else:
        account = None
        if AM_ROOT:
            account = ordinary_account()
            if account is None:
                pytest.skip(f"cannot create the ordinary account {TEST_ACCOUNT} to run the daemon as")
            probe = subprocess.run(
                [sys.executable, "-c", "import sagecell_tw.tap, twisted.scripts.twistd"],
                env=dict(os.environ, PYTHONPATH=ROOT),
                cwd="/",
                user=account.pw_uid,
                group=account.pw_gid,
                extra_groups=[],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if probe.returncode != 0:
                pytest.skip(f"{TEST_ACCOUNT} cannot run the daemon from {ROOT}: {probe.stderr.strip()[-300:]}")
        if not sandbox.user_namespaces_available():
            pytest.skip("this machine does not let ordinary accounts create user namespaces")
        daemon = DaemonAs(account, **options)
        kernel_uid = account.pw_uid if account is not None else os.getuid()
    daemon.start()
    e = None
    try:
        if variant == "sage":
            wait_pool_of(daemon, "sagemath")
        e = Env(variant, daemon, kernel_uid)
        yield e
        # The module-level check: after every attack, the daemon still serves.
        e.assert_serving("all the attacks")
    finally:
        if e is not None:
            for path in e.cleanup:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        daemon.stop()
        shutil.rmtree(daemon.tmp, ignore_errors=True)


@pytest.fixture(scope="module", params=VARIANTS)
def env(request):
    with attacked(request.param) as e:
        yield e


def secret_file(env: Env, path: str) -> str:
    """A 0600 file with a known secret, owned by the daemon's account; removed at the end."""
    secret = "s3cret-" + uuid.uuid4().hex
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    if AM_ROOT and env.daemon.account is not None:
        os.chown(path, env.daemon.account.pw_uid, -1)
    env.cleanup.append(path)
    return secret


# -- reading what belongs to the daemon ----------------------------------------------


def test_cannot_read_the_daemons_files(env):
    d = env.daemon
    secrets = {}
    places = [
        os.path.join(d.tmp, "secret"),
        os.path.join(d.run_dir, "secret"),
        f"/tmp/sagecell-secret-{uuid.uuid4().hex}",
    ]
    if AM_ROOT:
        places.append(f"/root/sagecell-secret-{uuid.uuid4().hex}")
    for path in places:
        secrets[path] = secret_file(env, path)
    daemon_files = [
        f"/proc/{env.daemon_pid}/environ",
        f"/proc/{env.daemon_pid}/cmdline",
        f"/proc/{env.daemon_pid}/maps",
        os.path.join(d.tmp, "permalinks.sqlite3"),
        d.log_path,
    ]
    assert os.path.exists(os.path.join(d.tmp, "permalinks.sqlite3"))
    with Session(env) as k:
        results = k.attack(
            f"""
control("read a file of my own", lambda: (open("mine", "w").write("x"), read("mine"))[1])
for p in {list(secrets) + daemon_files!r}:
    attempt("read " + p, lambda p=p: read(p))
for p in {[d.tmp, d.run_dir, env.base_dir, "/root"]!r}:
    attempt("list " + p, lambda p=p: listing(p))
attempt("list /proc/{env.daemon_pid}/fd", lambda: listing("/proc/{env.daemon_pid}/fd"))
attempt("list /proc/{env.daemon_pid}/cwd", lambda: listing("/proc/{env.daemon_pid}/cwd"))
"""
        )
        _, outputs = k.run("print('nothing')")
    assert_contained(results)
    shown = json.dumps(results) + stdout_of(outputs)
    assert not any(s in shown for s in secrets.values())
    env.assert_serving("reading the daemon's files")


# -- identity and privileges ----------------------------------------------------------


def test_kernel_is_not_root_and_has_no_capabilities(env):
    with Session(env) as k:
        _, out = k.run("import os; print(os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups())")
        uid, euid, gid, egid, *_ = stdout_of(out).replace("[", " ").replace("]", " ").replace(",", " ").split()
        results = k.attack(
            """
attempt("setuid(0)", lambda: os.setuid(0))
attempt("seteuid(0)", lambda: os.seteuid(0))
attempt("setgid(0)", lambda: os.setgid(0))
attempt("setgroups([0])", lambda: os.setgroups([0]))
open("owned", "w").write("x")
attempt("chown a file to root", lambda: os.chown("owned", 0, 0))
attempt("mount a tmpfs", lambda: mount_tmpfs(os.path.abspath("mnt")))
attempt("bind-mount / over my dir", lambda: bind_mount("/", os.path.abspath("mnt2")))
import resource
for limit in ("RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_CPU", "RLIMIT_NOFILE"):
    attempt("raise " + limit, lambda w=getattr(resource, limit): raise_limit(w))
# Harmless values: were these to succeed outside a namespace, nothing changes.
attempt("sethostname", lambda: socket.sethostname(socket.gethostname()))
attempt("set the clock", lambda: time.clock_settime(time.CLOCK_REALTIME, time.time()))
for name in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
    v = status_field(name)
    if int(v, 16):
        _results[name] = "SUCCEEDED: has capabilities " + v
    else:
        _results[name] = "blocked: none"
_results["NoNewPrivs"] = "blocked: 1" if status_field("NoNewPrivs") == "1" else "SUCCEEDED: NoNewPrivs is " + status_field("NoNewPrivs")
"""
        )
    assert int(uid) != 0 and int(euid) != 0 and int(gid) != 0 and int(egid) != 0
    assert int(uid) == env.kernel_uid, f"kernel runs as uid {uid}, expected {env.kernel_uid}"
    if env.variant in ("root", "sage"):
        assert int(uid) == pwd.getpwnam(WORKER).pw_uid
    assert_contained(results)
    env.assert_serving("privilege checks")


def test_cannot_undo_the_sandbox_mounts(env):
    """Unmounting what hides the host (fresh /proc, tmpfs over /tmp and the run dir) must fail, and reveal nothing."""
    public = f"/tmp/sagecell-public-{uuid.uuid4().hex}"
    with open(public, "w") as f:
        f.write("world-readable host file")
    os.chmod(public, 0o644)
    env.cleanup.append(public)
    with Session(env) as k, Session(env) as other:
        _, out = other.run("import os; print(os.getcwd())")
        other_dir = os.path.dirname(stdout_of(out).strip())
        results = k.attack(
            f"""
for target in ("/proc", "/tmp", "/dev/shm", {env.daemon.run_dir!r}, {env.base_dir!r}, os.path.dirname(os.getcwd())):
    attempt("umount " + target, lambda t=target: umount(t))
def nested(target):
    # A user namespace of its own is allowed (it maps nothing new); undoing mounts from there is not.
    try:
        unshare(0x10000000 | 0x00020000)  # CLONE_NEWUSER | CLONE_NEWNS
    except OSError:
        pass
    return umount(target)
for target in ("/proc", "/tmp", {env.daemon.run_dir!r}):
    _results["umount in a nested namespace " + target] = in_child(lambda t=target: nested(t))
attempt("read host /tmp file afterwards", lambda: read({public!r}))
attempt("list the other kernel's dir afterwards", lambda: listing({other_dir!r}))
pids = [p for p in os.listdir("/proc") if p.isdigit()]
_results["host processes visible afterwards"] = "blocked: %d" % len(pids) if len(pids) < 20 else "SUCCEEDED: %d processes" % len(pids)
"""
        )
        assert_contained(results)
        reply, _ = other.run("1+1")
        assert reply["status"] == "ok"
    env.assert_serving("undoing the sandbox mounts")


# -- network ------------------------------------------------------------------------


def test_no_network_egress(env):
    listeners, udps = [], []
    addresses = ["127.0.0.1", *local_addresses()]
    try:
        for addr in addresses:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            t = socket.socket(family, socket.SOCK_STREAM)
            t.bind((addr, 0))
            t.listen(16)
            t.setblocking(False)
            listeners.append(t)
            u = socket.socket(family, socket.SOCK_DGRAM)
            u.bind((addr, 0))
            u.setblocking(False)
            udps.append(u)
        tcp = [(s.getsockname()[0], s.getsockname()[1]) for s in listeners]
        udp = [(s.getsockname()[0], s.getsockname()[1]) for s in udps]
        control_socket = os.path.join(env.daemon.run_dir, "control")
        assert os.path.exists(control_socket)
        with Session(env) as k:
            results = k.attack(
                f"""
control("own loopback", lambda: (socket.socket().bind(("127.0.0.1", 0)), "ok")[1])
attempt("HTTP to the daemon", lambda: tcp_connect("127.0.0.1", {env.daemon.port}))
import urllib.request
attempt("GET the daemon's /api", lambda: urllib.request.urlopen("http://127.0.0.1:{env.daemon.port}/api", timeout=1).read())
for host, port in {tcp!r}:
    attempt("tcp %s:%d" % (host, port), lambda h=host, p=port: tcp_connect(h, p))
for host, port in {udp!r}:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    def send(h=host, p=port, fam=fam):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            for _ in range(3):
                s.sendto(b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x07example\\x03com\\x00\\x00\\x01\\x00\\x01", (h, p))
        finally:
            s.close()
    # Sending may "work" into the kernel's own network; the test checks nothing arrives.
    try:
        send()
    except OSError:
        pass
names = [n for _, n in socket.if_nameindex()]
_results["interfaces"] = "blocked: only lo" if names == ["lo"] else "SUCCEEDED: sees " + repr(names)
routes = open("/proc/net/route").read().splitlines()[1:] + open("/proc/net/ipv6_route").read().splitlines()
routes = [r for r in routes if " lo" not in r and not r.rstrip().endswith("lo")]
_results["routes"] = "blocked: none" if not routes else "SUCCEEDED: " + repr(routes[:3])
if names == ["lo"] and not routes:
    # Only with no way out: a lookup must then fail without reaching any resolver.
    attempt("DNS lookup", lambda: socket.getaddrinfo("example.com", 80))
attempt("AF_UNIX connect to the daemon's control socket", lambda: unix_connect({control_socket!r}))
"""
            )
        time.sleep(0.2)
        for s in listeners:
            try:
                conn, peer = s.accept()
                conn.close()
                results[f"listener {s.getsockname()[:2]} got a connection"] = f"SUCCEEDED: from {peer}"
            except BlockingIOError:
                pass
        for s in udps:
            try:
                data, peer = s.recvfrom(4096)
                results[f"UDP {s.getsockname()[:2]} got a datagram"] = f"SUCCEEDED: {data[:20]!r} from {peer}"
            except BlockingIOError:
                pass
    finally:
        for s in listeners + udps:
            s.close()
    assert_contained(results)
    env.assert_serving("network egress")


# -- resource bombs ---------------------------------------------------------------------


def test_fork_bomb_hits_the_process_limit(env):
    with Session(env) as k:
        results = k.attack(
            f"""
pids, err = [], None
for i in range(500):
    try:
        pid = os.fork()
    except OSError as e:
        err = "%s: %s" % (type(e).__name__, e)
        break
    if pid == 0:
        try:
            time.sleep(30)
        finally:
            os._exit(0)
    pids.append(pid)
for p in pids:
    try:
        os.kill(p, signal.SIGKILL)
    except OSError:
        pass
for p in pids:
    try:
        os.waitpid(p, 0)
    except OSError:
        pass
_results["forked"] = ("blocked: " if err else "SUCCEEDED: ") + "%d processes, then %s" % (len(pids), err)
_results["count"] = "blocked: %d" % len(pids) if len(pids) <= {PROCESSES} else "SUCCEEDED: %d > limit" % len(pids)
"""
        )
        assert_contained(results)
        env.assert_serving("a fork bomb")
        status, body, _ = env.daemon.request("POST", f"/api/kernels/{k.id}/restart")
        assert status == 200, (status, body)
        still_works(k)
    with Session(env) as fresh:
        still_works(fresh)


def died(outputs: list[dict]) -> bool:
    return any(m["msg_type"] == "status" and m["content"]["execution_state"] == "dead" for m in outputs)


def test_memory_bomb_is_a_memory_error(env):
    with Session(env) as k:
        reply, outputs = k.client.execute(
            PRELUDE
            + f"""
try:
    x = bytearray(4 << 30)
    _results["4 GiB at once"] = "SUCCEEDED: got 4 GiB"
    del x
except MemoryError:
    _results["4 GiB at once"] = "blocked: MemoryError"
chunks = []
try:
    for _ in range(64):
        chunks.append(b"\\1" * (64 << 20))
    _results["4 GiB in 64 MiB steps"] = "SUCCEEDED: got 4 GiB"
except MemoryError:
    _results["4 GiB in 64 MiB steps"] = "blocked: MemoryError after %d MiB" % (64 * len(chunks))
got = 64 * len(chunks)
del chunks
_results["held at most"] = ("blocked: " if got << 20 <= {ADDRESS_SPACE} else "SUCCEEDED: ") + "%d MiB" % got
report()
""",
            timeout=20,
        )
        if reply["status"] == "dead":
            # It died cleanly, and the session was told.
            assert died(outputs)
        else:
            # Or the kernel survived: it says what it got, and still works.
            m = re.search(r"^@@RESULTS@@(.*)$", stdout_of(outputs), re.M)
            assert m, (reply, outputs)
            assert_contained(json.loads(m.group(1)))
            still_works(k)
    with open("/proc/meminfo") as f:
        available = int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1)) << 10
    assert available > 1 << 30, "the machine is short of memory after the bomb"
    env.assert_serving("a memory bomb")


def test_cpu_loop_is_interrupted_at_the_wall_clock_limit(env):
    with Session(env) as k:
        t0 = time.monotonic()
        req = k.client.start_execute("while True: pass")
        time.sleep(1.0)
        env.assert_serving("a CPU loop (while it runs)")
        reply, outputs = k.client.outcome(req, timeout=EXEC_TIMEOUT + 12)
        took = time.monotonic() - t0
        assert reply["status"] == "error", reply
        assert took < EXEC_TIMEOUT + 3, f"interrupted after {took:.1f} s, limit {EXEC_TIMEOUT} s"
        text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
        assert re.search(r"\[sagecell\].*limit", text), text
        still_works(k)
    env.assert_serving("a CPU loop")


FILL = """
import os
def fill(where, size, count):
    total, err = 0, None
    names = []
    chunk = b"\\0" * (1 << 20)
    try:
        for i in range(count):
            name = os.path.join(where, "fill-%s-%d" % (os.getpid(), i))
            names.append(name)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for _ in range(size >> 20):
                    total += os.write(fd, chunk)
            finally:
                os.close(fd)
            print("@@TOTAL@@", total, flush=True)
    except OSError as e:
        err = "%s: %s" % (type(e).__name__, e)
    finally:
        for name in names:
            try:
                os.unlink(name)
            except OSError:
                pass
    print("@@TOTAL@@", total, flush=True)
    return total, err
"""


def filled(outputs: list[dict]) -> int:
    totals = re.findall(r"^@@TOTAL@@ (\d+)$", stdout_of(outputs), re.M)
    return int(totals[-1]) if totals else 0


def test_disk_fill_one_big_file_hits_the_file_size_limit(env):
    with Session(env) as k:
        results = k.attack(
            FILL
            + f"""
total, err = fill(".", 30 << 20, 1)
_results["one 30 MiB file"] = ("blocked: " if err else "SUCCEEDED: ") + "%d bytes, %s" % (total, err)
_results["size"] = ("blocked: " if total <= {FILE_SIZE} else "SUCCEEDED: ") + "%d bytes" % total
"""
        )
        assert_contained(results)
        assert "File too large" in results["one 30 MiB file"] or "EFBIG" in results["one 30 MiB file"]
    env.assert_serving("one big file")


@pytest.mark.parametrize("where", ["work", "/tmp", "/dev/shm"])
def test_disk_fill_many_files_stops_at_the_quota(env, where):
    """Files just under the size limit, until something stops them: the total stays near the quota."""
    with Session(env) as k:
        target = "." if where == "work" else where
        reply, outputs = k.run(FILL + f"\nprint(fill({target!r}, 19 << 20, 10))\n", timeout=20)
        total = filled(outputs)
        assert total <= DISK_QUOTA + FILE_SIZE, (
            f"wrote {total >> 20} MiB into {where} (quota {DISK_QUOTA >> 20} MiB); reply {reply.get('status')}, "
            f"{stdout_of(outputs)[-300:]!r}"
        )
        text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
        stopped = re.search(r"^\(\d+, '\w*Error", text, re.M) or re.search(r"\[sagecell\].*quota", text)
        assert stopped, f"nothing said why the writes stopped: {text[-300:]!r}"
    env.assert_serving(f"filling {where}")


def test_disk_over_quota_ends_the_kernel_saying_why(env):
    """Files that stay over the quota: the kernel is ended, the visitor told why, and a restart works."""
    with Session(env) as k:
        code = f"""
import os, time
chunk = b"\\0" * (1 << 20)
for i in range(3):
    with open("keep-%d" % i, "wb") as f:
        for _ in range({FILE_SIZE >> 20} - 1):
            f.write(chunk)
print("written", flush=True)
time.sleep({EXEC_TIMEOUT} - 0.5)
"""
        k.client.send(msg("execute_request", {"code": code, "silent": False}))
        outputs = []
        deadline = time.monotonic() + EXEC_TIMEOUT + 8
        while time.monotonic() < deadline and not died(outputs):
            try:
                outputs.append(k.client.recv(max(0.1, deadline - time.monotonic())))
            except Exception:
                break
        text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
        # Ended at once by the inotify accounting, or by the periodic scan after "written".
        assert died(outputs), f"a kernel over its {DISK_QUOTA >> 20} MiB quota was not ended: {text!r}"
        assert re.search(r"\[sagecell\].*quota", text), text
        env.assert_serving("a kernel over its disk quota")
        status, body, _ = env.daemon.request("POST", f"/api/kernels/{k.id}/restart")
        assert status == 200, (status, body)
        still_works(k)


# -- other kernels -------------------------------------------------------------------------


def test_cannot_signal_read_or_trace_another_kernel(env):
    with Session(env) as a, Session(env) as b:
        _, out = b.run("import os\nopen('secret.txt', 'w').write('b-secret')\nprint(os.getpid(), os.getcwd())")
        b_inner, b_cwd = stdout_of(out).split()
        b_dir = os.path.dirname(b_cwd)
        b_host = b.host_pids()
        assert len(b_host) >= 1
        _, out = a.run("import os; print(os.getpid())")
        a_inner = int(stdout_of(out))
        targets = sorted(set(b_host) | ({int(b_inner)} - {a_inner}))
        ipc = [os.path.join(b_dir, "ipc", f"k-{n}") for n in range(1, 6)]
        results = a.attack(
            f"""
control("read my own environ", lambda: read("/proc/self/environ"))
for pid in {targets!r}:
    attempt("read /proc/%d/environ" % pid, lambda p=pid: read("/proc/%d/environ" % p))
    attempt("list /proc/%d/cwd" % pid, lambda p=pid: listing("/proc/%d/cwd" % p))
    attempt("list /proc/%d/root" % pid, lambda p=pid: listing("/proc/%d/root%s" % (p, {b_cwd!r})))
    attempt("ptrace attach %d" % pid, lambda p=pid: ptrace_attach(p))
    attempt("SIGKILL %d" % pid, lambda p=pid: os.kill(p, signal.SIGKILL))
attempt("read B's file by path", lambda: read({os.path.join(b_cwd, "secret.txt")!r}))
attempt("list B's work dir", lambda: listing({b_cwd!r}))
attempt("list B's kernel dir", lambda: listing({b_dir!r}))
attempt("read B's connection file (its key)", lambda: read({os.path.join(b_dir, "ipc", "kernel.json")!r}))
attempt("list the kernels dir", lambda: listing({env.base_dir!r}))
for path in {ipc!r}:
    attempt("AF_UNIX connect " + path, lambda p=path: unix_connect(p))
# Last: every process this kernel may signal (ESRCH when it reaches none but its own).
attempt("SIGKILL to every process I may signal", lambda: os.kill(-1, signal.SIGKILL))
"""
        )
        assert_contained(results)
        t0 = time.monotonic()
        reply, out = b.run("print(open('secret.txt').read(), 1+1)")
        assert reply["status"] == "ok" and stdout_of(out) == "b-secret 2\n"
        assert time.monotonic() - t0 < PROMPT
        assert all(os.path.exists(f"/proc/{p}") for p in b_host[:1])
    env.assert_serving("attacks on another kernel")


def kernel_of(env: Env, session_id: str) -> str:
    """The kernel id behind a session, from the daemon's log."""
    found = re.findall(rf"session {session_id} got kernel (\w+)", env.daemon.log())
    assert found, f"no kernel logged for session {session_id}"
    return found[-1]


def pooled_kernels(env: Env) -> set[str]:
    """Kernels ready and not taken by any session (from the daemon's log)."""
    log = env.daemon.log()
    ready = set(re.findall(r"kernel (\w+) ready \(pid", log))
    gone = set(re.findall(r"got kernel (\w+)", log)) | set(re.findall(r"kernel (\w+) died", log))
    return ready - gone


def own_secrets(k: Session) -> dict[str, str]:
    """A session's kernel id, dir and HMAC key, as the kernel itself sees them."""
    _, out = k.run("import os\nprint(get_ipython().kernel.session.key.decode(), os.path.dirname(os.getcwd()))")
    key, kdir = stdout_of(out).split()
    kid = kernel_of(k.env, k.id)
    assert os.path.basename(kdir) == kid
    return {f"key of {kid}": key, f"id of {kid}": kid}


def test_no_other_kernels_secrets_in_a_kernels_memory(env):
    """
    A kernel reads all its memory, freed heap included: no id, dir or key
    of another kernel is in it, neither of sessions opened before it nor of
    kernels waiting in the pool, from whose master it was forked.
    """
    with Session(env) as a, Session(env) as b:
        known = {**own_secrets(a), **own_secrets(b)}
        env.daemon.wait_pool(1)
        deadline = time.monotonic() + 30
        while len(pooled_kernels(env)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        with Session(env) as scanner:
            scanner.run("1")
            pooled = pooled_kernels(env) - {kernel_of(env, scanner.id)}
            assert pooled, "no pooled kernel at scan time: the test would prove less"
            read = scan_memory(scanner.client, "_controls.append(get_ipython().kernel.session.key)")
            # Now take every kernel that was in the pool at scan time, and learn its key.
            taken: list[Session] = []
            try:
                for _ in range(len(pooled) + 6):
                    if not pooled - {kernel_of(env, t.id) for t in taken}:
                        break
                    taken.append(Session(env))
                for t in taken:
                    if kernel_of(env, t.id) in pooled:
                        known.update(own_secrets(t))
                assert {k.split()[-1] for k in known} >= pooled
                found = found_in_memory(scanner.client, known)
            finally:
                for t in taken:
                    t.end()
        print(f"scanned {read >> 20} MiB; looked for {sorted(known)}")
        assert not found, f"a kernel found in its own memory: {found}"
    env.assert_serving("a memory scan")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_forged_pid_record_is_not_adopted_after_a_spawner_restart(env):
    """
    A kernel names a sibling's host pid (and start time) as its own wherever
    it can: its work dir, its kernel dir's pid file (read-only to it) and the
    fork server's records dir (hidden from it). The
    spawner is killed and restarted; the new one adopts the kernels in use.
    Ending the forger's session must end the forger, not its victim.
    """
    with Session(env) as forger, Session(env) as victim:
        victim.run("x = 41")
        victim_pid = env.daemon.kernel_pid(victim.id)
        forger_pid = env.daemon.kernel_pid(forger.id)
        with open(f"/proc/{victim_pid}/stat") as f:
            victim_start = f.read().rsplit(")", 1)[1].split()[19]
        forger_kid = kernel_of(env, forger.id)
        forged = f"{victim_pid} {victim_start}"
        record = json.dumps({"pid": victim_pid, "start": victim_start, "owner": ""})
        results = forger.attack(
            f"""
mine = os.path.dirname(os.getcwd())
control("write in my own work dir", lambda: open("pid", "w").write({forged!r}))
attempt("forge the pid file in my own kernel dir", lambda: open(os.path.join(mine, "pid"), "w").write({forged!r}))
attempt("write a record where the fork server keeps them",
        lambda: open({os.path.join(env.base_dir, ".records", forger_kid)!r}, "w").write({record!r}))
attempt("list the records", lambda: listing({os.path.join(env.base_dir, ".records")!r}))
"""
        )
        assert_contained(results)
        joined = len(re.findall(r"spawner \S+ joined", env.daemon.log()))
        front = env.spawner_pids()[0]
        os.kill(front, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(re.findall(r"spawner \S+ joined", env.daemon.log())) <= joined and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(re.findall(r"spawner \S+ joined", env.daemon.log())) > joined, "no new spawner joined"
        still_works(victim)
        forger.end()
        deadline = time.monotonic() + 10
        while alive(forger_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(forger_pid), "the forger's kernel outlived its session"
        assert alive(victim_pid), "ending the forger's session killed its victim's kernel"
        reply, out = victim.run("print(x + 1)")
        assert reply["status"] == "ok" and stdout_of(out) == "42\n", (reply, stdout_of(out))
    env.assert_serving("a forged pid record and a spawner restart")


def world_writable_dirs(limit: int = 200) -> list[str]:
    """This machine's world-writable dirs on the root file system (``/tmp`` and the like), bounded."""
    out = subprocess.run(
        ["find", "/", "-xdev", "(", "-path", "/proc", "-o", "-path", "/sys", ")", "-prune", "-o", "-type", "d", "-perm", "-0002", "-print"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    return out[:limit]


def test_nothing_left_over_from_an_earlier_session(env):
    name = f"sagecell-marker-{uuid.uuid4().hex}"
    places = sorted({"/tmp", "/var/tmp", "/dev/shm", *world_writable_dirs()})
    for place in places:
        env.cleanup.append(os.path.join(place, name))
    first = Session(env)
    _, out = first.run(
        f"""
import os
for d in (".", os.path.expanduser("~"), *{places!r}):
    try:
        with open(os.path.join(d, {name!r}), "w") as f:
            f.write("left over")
        print("wrote", os.path.abspath(os.path.join(d, {name!r})))
    except OSError as e:
        print("could not write in", d, e)
print("cwd", os.getcwd())
"""
    )
    text = stdout_of(out)
    assert "wrote " in text, text
    first_cwd = re.search(r"^cwd (.*)$", text, re.M).group(1)
    first.end()
    with Session(env) as second:
        results = second.attack(
            f"""
name = {name!r}
control("my own cwd is listable", lambda: os.listdir("."))
for d in ({first_cwd!r}, ".", os.path.expanduser("~"), *{places!r}):
    attempt("find %s in %s" % (name, d), lambda d=d: read(os.path.join(d, name)))
"""
        )
    assert_contained(results)
    env.assert_serving("looking for left-over files")


def test_cannot_write_outside_its_own_dir(env):
    """Anywhere but its own dir and its private /tmp, a kernel's writes are refused: nothing to leave, fill or change."""
    name = f"sagecell-written-{uuid.uuid4().hex}"
    private = ("/tmp", "/dev/shm")
    places = sorted(
        {"/", "/etc", "/usr/local/lib", "/var/tmp", "/home", "/root", ROOT, os.path.join(ROOT, "sagecell_tw"), sys.prefix, *world_writable_dirs()}
        - set(private)
    )
    for place in places:
        env.cleanup.append(os.path.join(place, name))
    with Session(env) as k:
        results = k.attack(
            f"""
name = {name!r}
def create(d):
    with open(os.path.join(d, name), "x") as f:
        f.write("was here")
    return "created in " + d
control("write in my own dir", lambda: create("."))
for d in {list(private)!r}:
    control("write in my private " + d, lambda d=d: create(d))
for d in {places!r}:
    attempt("create a file in " + d, lambda d=d: create(d))
"""
        )
    assert_contained(results)
    assert not [p for p in places if os.path.lexists(os.path.join(p, name))]
    env.assert_serving("writing outside its own dir")


def test_cannot_read_its_own_accounts_files_outside_its_dir(env):
    """
    A file of the kernel's own account (the daemon's, when the daemon is not
    root), 0600 in a 0700 dir, and a world-readable one beside it: neither
    can be read, though the account's permissions would allow it.
    """
    where = f"/var/cache/sagecell-secret-{uuid.uuid4().hex}"
    os.makedirs(where, 0o700)
    try:
        mine = os.path.join(where, "mine.txt")
        public = os.path.join(where, "public.txt")
        for path, mode in ((mine, 0o600), (public, 0o644)):
            with open(path, "w") as f:
                f.write("secret of the kernel's own account")
            os.chmod(path, mode)
            os.chown(path, env.kernel_uid, -1)
        os.chown(where, env.kernel_uid, -1)
        with Session(env) as k:
            results = k.attack(
                f"""
control("read a system file", lambda: read("/etc/hostname") or "empty")
control("read a file in my own dir", lambda: (open("x", "w").write("x"), read("x"))[1])
attempt("read my account's own 0600 file", lambda: read({mine!r}))
attempt("read a world-readable file there", lambda: read({public!r}))
attempt("list its dir", lambda: os.listdir({where!r}))
"""
            )
        assert_contained(results)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_homes_are_hidden(env):
    """People's homes are empty in a kernel, even where their files are world-readable."""
    home = f"/home/sagecell-home-{uuid.uuid4().hex}"
    os.makedirs(home, 0o755)
    try:
        note = os.path.join(home, "note.txt")
        with open(note, "w") as f:
            f.write("private notes")
        os.chmod(note, 0o644)
        with Session(env) as k:
            results = k.attack(
                f"""
attempt("read a world-readable file in a home", lambda: read({note!r}))
attempt("list /home", lambda: listing("/home"))
"""
            )
        assert_contained(results)
    finally:
        shutil.rmtree(home, ignore_errors=True)


# -- /proc and setuid binaries ---------------------------------------------------------------


def test_no_escape_through_proc(env):
    public = f"/tmp/sagecell-public-{uuid.uuid4().hex}"
    with open(public, "w") as f:
        f.write("world-readable host file")
    os.chmod(public, 0o644)
    env.cleanup.append(public)
    secret_path = os.path.join(env.daemon.run_dir, f"secret-{uuid.uuid4().hex}")
    secret = secret_file(env, secret_path)
    hosts = env.spawner_pids() + [env.daemon_pid]
    assert len(hosts) >= 2, env.daemon.log()[-2000:]
    with Session(env) as k:
        results = k.attack(
            f"""
via = ["/proc/1/root", "/proc/self/root/../..", "/proc/self/cwd/../../../../../../.."]
via += ["/proc/%d/root" % p for p in {hosts!r}]
for prefix in via:
    attempt("read host /tmp via " + prefix, lambda p=prefix: read(p + {public!r}))
    attempt("read the daemon's secret via " + prefix, lambda p=prefix: read(p + {secret_path!r}))
    attempt("list the kernels dir via " + prefix, lambda p=prefix: listing(p + {env.base_dir!r}))
attempt("read host /tmp directly", lambda: read({public!r}))
for p in {hosts!r}:
    for what in ("environ", "cmdline", "status", "maps", "mountinfo"):
        attempt("read /proc/%d/%s" % (p, what), lambda p=p, w=what: read("/proc/%d/%s" % (p, w)))
    attempt("list /proc/%d/fd" % p, lambda p=p: listing("/proc/%d/fd" % p))
    attempt("SIGKILL %d" % p, lambda p=p: os.kill(p, signal.SIGKILL))
mine = open("/proc/self/comm").read().strip()
names = []
for p in [p for p in os.listdir("/proc") if p.isdigit()][:200]:
    try:
        names.append(open("/proc/%s/comm" % p).read().strip())
    except OSError:
        pass
foreign = sorted(set(n for n in names if n != mine))
_results["processes visible"] = "SUCCEEDED: sees " + repr(foreign[:10]) if foreign else "blocked: only mine"
"""
        )
    assert_contained(results)
    assert secret not in json.dumps(results)
    assert all(os.path.exists(f"/proc/{p}") for p in hosts), "the daemon or its spawner died"
    env.assert_serving("escapes through /proc")


SETUID_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/lib/openssh", "/usr/lib/dbus-1.0")


def test_setuid_binaries_do_not_give_root(env):
    with Session(env) as k:
        _, out = k.run(
            f"""
import os, stat
found = set()
for d in {SETUID_DIRS!r}:
    try:
        names = os.listdir(d)
    except OSError:
        continue
    for n in names[:5000]:
        try:
            st = os.stat(os.path.join(d, n))
        except OSError:
            continue
        # Root shows as the overflow uid inside the kernel's user namespace: any owner counts.
        if st.st_mode & stat.S_ISUID:
            found.add(os.path.realpath(os.path.join(d, n)))
print(sorted(found))
print(open("/proc/self/status").read().split("NoNewPrivs:")[1].split()[0])
"""
        )
        lines = stdout_of(out).splitlines()
        found, no_new_privs = json.loads(lines[0].replace("'", '"')), lines[1]
        assert no_new_privs == "1", "NoNewPrivs must be set in kernels"
        if not found:
            pytest.skip("no setuid binary in the kernel's view to try")
        # Each in its own execution: PAM may sleep on a failed su.
        runs = {
            "su -c id root": "subprocess.run(['su', '-c', 'id -u; id -g', 'root'], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=2)",
            "newgrp root": "subprocess.run(['newgrp', 'root'], input='id -u; id -g\\n', capture_output=True, text=True, timeout=2)",
            "mount a tmpfs": "subprocess.run(['mount', '-t', 'tmpfs', 'none', os.path.abspath('m')], capture_output=True, text=True, timeout=2)",
            "passwd -S root": "subprocess.run(['passwd', '-S', 'root'], capture_output=True, text=True, timeout=2)",
        }
        results = {}
        for name, call in runs.items():
            r = k.attack(
                f"""
os.makedirs("m", exist_ok=True)
def go():
    try:
        r = {call}
    except subprocess.TimeoutExpired as e:
        raise OSError(errno.ETIMEDOUT, "timed out, so it did not succeed: %r" % (e.stdout,))
    out = (r.stdout or "").split()
    if "0" in out or (r.returncode == 0 and {name!r}.startswith(("mount", "passwd"))):
        return "root? rc=%d out=%r err=%r" % (r.returncode, r.stdout, (r.stderr or "")[:200])
    raise OSError(errno.EPERM, "rc=%d %s" % (r.returncode, (r.stderr or "").strip()[:200]))
attempt("run", go)
_results["a mount appeared"] = "SUCCEEDED: " + repr(os.listdir("m")) if os.listdir("m") else "blocked: none"
""",
                timeout=10,
            )
            results.update({f"{name}: {step}": v for step, v in r.items()})
    assert_contained(results)
    env.assert_serving("setuid binaries")
