"""
A worker host's side of the file commands, on real files in a temp dir,
with hostile input: the daemon's link is authenticated, but nothing it says
is taken on trust.
"""

from __future__ import annotations

import os
import time

import pytest

from sagecell_tw.files import worker as worker_files
from sagecell_tw.files.worker import CHUNK, WorkerFiles

KID = "0123abcd"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def host(tmp_path):
    work = tmp_path / "base" / KID / "work"
    work.mkdir(parents=True)
    (work / "a.txt").write_bytes(b"hello")
    (work / "sub").mkdir()
    (work / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)
    (work / ".hidden").write_bytes(b"h")
    w = WorkerFiles(str(tmp_path / "base"), os.geteuid(), clock=Clock())
    w.kernel_ready(KID)
    w.work = work
    w.outside = tmp_path / "outside"
    w.outside.mkdir()
    (w.outside / "secret").write_bytes(b"secret")
    return w


def cmd(w: WorkerFiles, op: str, data: bytes | None = None, **fields):
    msg = {"cmd": "files", "req": 7, "op": op, "kernel": KID, **fields}
    reply, out = w.handle(msg, data)
    assert reply["event"] == "files" and reply["req"] == 7
    return reply, out


def error(reply_out, status: int) -> str:
    reply, out = reply_out
    assert reply["ok"] is False and reply["status"] == status, reply
    assert out is None
    return reply["message"]


def upload(w, path, payload: bytes, max_upload=1 << 20, quota=0, size=None):
    reply, _ = cmd(
        w, "open", path=path, size=len(payload) if size is None else size, max_upload=max_upload, quota=quota
    )
    if not reply["ok"]:
        return reply
    token = reply["upload"]
    for i in range(0, len(payload), CHUNK):
        r, _ = cmd(w, "write", payload[i : i + CHUNK], upload=token, offset=i)
        if not r["ok"]:
            return r
    return cmd(w, "commit", upload=token)[0]


def temp_files(w) -> list[str]:
    return [n for n in os.listdir(w.work) if n.startswith(".upload-")]


def test_list_read_and_scan(host):
    reply, _ = cmd(host, "list", path=[])
    assert reply["ok"] and reply["kind"] == "dir" and not reply["truncated"]
    assert sorted(p for p, _s, _m in reply["files"]) == ["a.txt", "sub/b.bin"]  # no dot files
    reply, _ = cmd(host, "list", path=["sub"])
    assert [f[0] for f in reply["files"]] == ["b.bin"] and reply["parts"] == ["sub"]
    reply, _ = cmd(host, "list", path=["sub", "b.bin"])
    assert reply["kind"] == "file" and reply["size"] == 1024 and reply["parts"] == ["sub", "b.bin"]
    tag = reply["tag"]
    reply, data = cmd(host, "read", path=["sub", "b.bin"], offset=250, length=10, tag=tag)
    assert reply["ok"] and data == bytes(range(250, 256)) + bytes(range(4))
    reply, data = cmd(host, "read", path=["sub", "b.bin"], offset=1020, length=100, tag=tag)
    assert data == bytes(range(252, 256))
    reply, _ = cmd(host, "scan")
    assert {f[0]: f[1] for f in reply["files"]} == {"a.txt": 5, "sub/b.bin": 1024}


def test_a_file_changed_during_a_download_is_refused(host):
    tag = cmd(host, "list", path=["a.txt"])[0]["tag"]
    (host.work / "a.txt").write_bytes(b"something else entirely")
    assert "changed" in error(cmd(host, "read", path=["a.txt"], offset=0, length=5, tag=tag), 409)


@pytest.mark.parametrize(
    "path",
    [[".."], ["..", "outside", "secret"], ["sub", "..", "a.txt"], ["a/b"], [""], ["x", "", "y"], ["a\0"], ["."]],
)
def test_traversal_is_400(host, path):
    error(cmd(host, "list", path=path), 400)
    error(cmd(host, "open", path=path, size=1, max_upload=10, quota=0), 400)


def test_symlinks_out_are_403_and_uploads_do_not_follow_them(host):
    os.symlink(str(host.outside / "secret"), host.work / "abs")
    os.symlink("../../../outside/secret", host.work / "rel")
    os.symlink(str(host.outside), host.work / "dirlink")
    os.symlink("a.txt", host.work / "inside")
    for name in ("abs", "rel", "dirlink"):
        error(cmd(host, "list", path=[name]), 403)
    assert cmd(host, "list", path=["inside"])[0]["size"] == 5  # a link that stays inside is fine
    reply = upload(host, ["dirlink", "planted"], b"x")
    assert reply["ok"] is False and reply["status"] in (403, 409)
    assert os.listdir(host.outside) == ["secret"] and temp_files(host) == []


def test_a_fifo_is_403_without_hanging(host):
    os.mkfifo(host.work / "fifo")
    t0 = time.monotonic()
    error(cmd(host, "list", path=["fifo"]), 403)
    error(cmd(host, "read", path=["fifo"], offset=0, length=10, tag="x"), 403)
    assert time.monotonic() - t0 < 1


def test_only_kernels_of_this_host(host, tmp_path):
    error(cmd(host, "list", path=[], kernel="ffff"), 404)
    for bad in ("../" + KID, None, 5, ["x"]):
        error(host.handle({"req": 1, "op": "list", "kernel": bad, "path": []}, None), 404)
    host.kernel_ready("../etc")  # never registered: not a kernel id
    assert host.kernels == {KID}
    host.kernel_dead(KID)
    error(cmd(host, "list", path=[]), 404)


@pytest.mark.parametrize(
    "fields",
    [
        {"op": "nope"},
        {"op": "list", "path": "a.txt"},
        {"op": "list", "path": [1]},
        {"op": "list", "path": ["a"] * 100},
        {"op": "read", "path": ["a.txt"], "offset": "0", "length": 1, "tag": ""},
        {"op": "read", "path": ["a.txt"], "offset": 0, "length": CHUNK + 1, "tag": ""},
        {"op": "read", "path": ["a.txt"], "offset": -1, "length": 1, "tag": ""},
        {"op": "read", "path": ["a.txt"], "offset": True, "length": 1, "tag": ""},
        {"op": "read", "path": ["a.txt"], "offset": 0, "length": 1, "tag": None},
        {"op": "open", "path": ["n"], "size": 1.5, "max_upload": 10, "quota": 0},
        {"op": "open", "path": ["n"], "size": 1, "max_upload": 1 << 60, "quota": 0},
        {"op": "open", "path": [], "size": 1, "max_upload": 10, "quota": 0},
    ],
)
def test_bad_fields_are_400(host, fields):
    msg = {"cmd": "files", "req": 7, "kernel": KID, **fields}
    reply, out = host.handle(msg, None)
    assert reply["ok"] is False and reply["status"] == 400 and out is None, reply
    assert temp_files(host) == []


def test_a_data_frame_only_with_write_and_within_a_chunk(host):
    error(cmd(host, "list", b"x", path=[]), 400)
    token = cmd(host, "open", path=["big"], size=2 * CHUNK, max_upload=4 * CHUNK, quota=0)[0]["upload"]
    error(cmd(host, "write", b"x" * (CHUNK + 1), upload=token, offset=0), 400)
    error(cmd(host, "write", None, upload=token, offset=0), 404)  # the refused write ended the upload
    assert temp_files(host) == [] and not (host.work / "big").exists()


def test_upload_round_trip_and_replace(host):
    payload = bytes(range(256)) * 2000  # over two chunks
    reply = upload(host, ["new", "deep", "file.bin"], payload)
    assert reply["ok"] and reply["size"] == len(payload) and reply["mtime_ns"] > 0
    assert (host.work / "new" / "deep" / "file.bin").read_bytes() == payload
    assert upload(host, ["a.txt"], b"replaced")["ok"]
    assert (host.work / "a.txt").read_bytes() == b"replaced"
    assert temp_files(host) == [] and host.uploads == {}


def test_refused_uploads_change_nothing(host):
    # over the per-file limit, declared
    assert upload(host, ["a.txt"], b"x" * 100, max_upload=10)["status"] == 413
    # more data than declared
    reply = upload(host, ["a.txt"], b"x" * 100, size=50)
    assert reply["status"] == 413
    # over the quota: 5 + 1024 + 1 bytes are there already (dot files count)
    reply = upload(host, ["c.txt"], b"x" * 1000, quota=1500)
    assert reply["status"] == 413 and "quota" in reply["message"]
    # this host's own quota holds whatever the daemon says
    host.disk_quota = 1500
    assert upload(host, ["c.txt"], b"x" * 1000, quota=0)["status"] == 413
    host.disk_quota = 0
    # a write out of order
    token = cmd(host, "open", path=["a.txt"], size=10, max_upload=100, quota=0)[0]["upload"]
    error(cmd(host, "write", b"12345", upload=token, offset=5), 400)
    # onto a directory
    assert upload(host, ["sub"], b"x")["status"] == 409
    # through a file as if it were a dir
    assert upload(host, ["a.txt", "x"], b"x")["status"] == 409
    assert (host.work / "a.txt").read_bytes() == b"hello"
    assert not (host.work / "c.txt").exists() and (host.work / "sub").is_dir()
    assert temp_files(host) == [] and host.uploads == {}


def test_idle_uploads_expire_and_a_dead_kernel_ends_its_uploads(host):
    token = cmd(host, "open", path=["n"], size=2, max_upload=10, quota=0)[0]["upload"]
    assert temp_files(host)
    host.clock.now += worker_files.UPLOAD_IDLE + 1
    host.expire()
    assert temp_files(host) == []
    error(cmd(host, "write", b"ab", upload=token, offset=0), 404)
    token = cmd(host, "open", path=["n"], size=2, max_upload=10, quota=0)[0]["upload"]
    host.kernel_dead(KID)
    assert temp_files(host) == [] and host.uploads == {}
    error(cmd(host, "commit", upload=token), 404)
    assert cmd(host, "abort", upload=token)[0]["ok"]  # aborting twice is harmless


def test_uploads_at_once_are_bounded(host):
    for i in range(worker_files.MAX_UPLOADS):
        assert cmd(host, "open", path=[f"f{i}"], size=1, max_upload=10, quota=0)[0]["ok"]
    error(cmd(host, "open", path=["one-more"], size=1, max_upload=10, quota=0), 503)
    host.close()
    assert temp_files(host) == []


def test_a_kernel_dir_replaced_by_a_link_is_refused(host, tmp_path):
    kdir = tmp_path / "base" / KID
    os.rename(kdir / "work", kdir / "gone")
    os.symlink(str(host.outside), kdir / "work")
    assert cmd(host, "list", path=[])[0]["status"] in (403, 404)
    assert upload(host, ["planted"], b"x")["status"] in (403, 404)
    assert os.listdir(host.outside) == ["secret"]


def test_a_bad_request_number_still_gets_an_answer(host):
    reply, _ = host.handle({"req": "x", "op": "list", "kernel": KID, "path": []}, None)
    assert reply["req"] is None and reply["ok"]


def test_the_spawner_front_serves_only_kernels_the_fork_server_announced(tmp_path):
    import argparse
    import json
    import types

    from sagecell_tw.worker.spawner import Front

    class Dealer:
        def __init__(self):
            self.sent = []

        def send(self, data, flags=0):
            self.sent.append([data])

        def send_multipart(self, frames, flags=0):
            self.sent.append(list(frames))

    (tmp_path / KID / "work").mkdir(parents=True)
    (tmp_path / KID / "work" / "f").write_bytes(b"\x00\x01\x02")
    config = types.SimpleNamespace(base_dir=str(tmp_path), disk_quota=0, daemon_gid=None)
    front = Front(None, 0, argparse.Namespace(name="t"), config)
    front.dealer = Dealer()
    ask = {"cmd": "files", "req": 1, "op": "list", "kernel": KID, "path": ["f"]}
    front._from_daemon([json.dumps(ask).encode()])
    assert json.loads(front.dealer.sent[-1][0])["status"] == 404  # not announced yet
    ready = {"id": KID, "connection": {"ip": str(tmp_path / KID / "ipc" / "k")}}
    told = json.loads(front._relayed(json.dumps({"event": "ready", "kernel": ready}).encode()))
    assert told["kernel"]["connection"]["ip"] == str(tmp_path / ".guard" / KID)  # the daemon reads it through its guard
    front._from_daemon([json.dumps(ask).encode()])
    tag = json.loads(front.dealer.sent[-1][0])["tag"]
    read = dict(ask, req=2, op="read", offset=1, length=5, tag=tag)
    front._from_daemon([json.dumps(read).encode()])
    reply, data = front.dealer.sent[-1]
    assert json.loads(reply)["req"] == 2 and data == b"\x01\x02"
    front._relayed(json.dumps({"event": "dead", "id": KID}).encode())
    front._from_daemon([json.dumps(read).encode()])
    assert json.loads(front.dealer.sent[-1][0])["status"] == 404
    front._from_daemon([b"{}", b"x", b"y"])  # three frames: not ours to answer
    assert len(front.dealer.sent) == 4
    front.guard.close_all()
