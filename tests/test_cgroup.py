"""
Memory cgroups per kernel (kernel/cgroup.py): finding the spawner's own
memory cgroup in cgroup v1 and v2 layouts, the clear reason where there is
none, and, as root on a machine with a writable memory cgroup (CI's, and
this one: cgroup v1), a real process over its limit killed and named.

The daemon-level tests (a Sage memory bomb ends with "ran out of memory",
the next session works) are in tests/test_sage.py.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from sagecell_tw.kernel import cgroup
from sagecell_tw.worker import forkserver, spawner

V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_OWN = "4:memory:/process_api/c5b7\n1:cpu:/\n0::/\n"
V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V2_OWN = "0::/system.slice/sagecell.service\n"


def files(tmp_path, mounts: str, own: str) -> dict:
    (tmp_path / "mountinfo").write_text(mounts)
    (tmp_path / "cgroup").write_text(own)
    return {"mountinfo": str(tmp_path / "mountinfo"), "cgroups": str(tmp_path / "cgroup")}


def test_cgroup_v1_memory_hierarchy_is_found(tmp_path):
    where = files(tmp_path, V1_MOUNTS, V1_OWN)
    assert cgroup.own_memory_cgroup(**where) == ("/sys/fs/cgroup/memory/process_api/c5b7", 1)


def test_a_cgroup_namespace_root_maps_into_its_mount(tmp_path):
    mounts = V1_MOUNTS.replace("0:32 / /sys/fs/cgroup/memory", "0:32 /process_api /sys/fs/cgroup/memory")
    where = files(tmp_path, mounts, V1_OWN)
    assert cgroup.own_memory_cgroup(**where) == ("/sys/fs/cgroup/memory/c5b7", 1)


def test_cgroup_v2_without_a_memory_controller_says_why(tmp_path):
    where = files(tmp_path, V2_MOUNTS.replace("/sys/fs/cgroup", str(tmp_path)), V2_OWN)
    (tmp_path / "cgroup.controllers").write_text("cpu io pids\n")
    with pytest.raises(cgroup.Unavailable, match="no memory controller"):
        cgroup.own_memory_cgroup(**where)
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert cgroup.own_memory_cgroup(**where) == (f"{tmp_path}/system.slice/sagecell.service", 2)


def test_no_cgroup_at_all_is_one_line_of_the_spawners_notes(tmp_path, monkeypatch):
    where = files(tmp_path, "22 1 0:5 / /proc rw - proc proc rw\n", "0::/\n")
    with pytest.raises(cgroup.Unavailable, match="no memory cgroup hierarchy"):
        cgroup.own_memory_cgroup(**where)
    real = cgroup.own_memory_cgroup
    monkeypatch.setattr(cgroup, "own_memory_cgroup", lambda **_: real(**where))
    config = forkserver.ForkConfig(base_dir=str(tmp_path / "kernels"))
    spawner.memory_cgroup(config, None)
    assert config.memory_cgroup is None
    assert config.notes == (
        "a memory cgroup per kernel (no memory cgroup hierarchy is mounted): "
        "real memory is held by the address-space limit only",
    )
    assert config.kernel_template()["notes"] == list(config.notes)


def writable_memory_cgroup() -> str | None:
    """This machine's own memory cgroup, where root may make one below it (else None)."""
    if os.geteuid() != 0:
        return None
    try:
        own, _version = cgroup.own_memory_cgroup()
    except (cgroup.Unavailable, OSError):
        return None
    return own if os.access(own, os.W_OK) else None


@pytest.mark.root
@pytest.mark.skipif(writable_memory_cgroup() is None, reason="needs root and a writable memory cgroup")
def test_a_process_over_its_memory_limit_is_killed_and_named(tmp_path):
    parent = cgroup.prepare(None, None).as_json()
    name = "k" + os.urandom(8).hex()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            cgroup.join(parent, name, 64 << 20)
            os.write(w, b"in")
            block = b"x" * (256 << 20)  # real pages, four times the limit
            code = len(block) and 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        assert os.read(r, 2) == b"in"
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert cgroup.oom_kills(parent, name) == 1
    finally:
        os.close(r)
        deadline = time.monotonic() + 5
        while not cgroup.remove(parent, name) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not os.path.exists(os.path.join(parent["path"], name))
