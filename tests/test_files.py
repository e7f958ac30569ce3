"""
Kernel files over HTTP against a real daemon with real forked kernels:
uploads, downloads, listings, the sagecell.files notification, and attacks.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tempfile
import threading
import time
import uuid

import pytest
import websocket
from support import Client, Daemon, stdout_of


@pytest.fixture(scope="module")
def daemon():
    d = Daemon("--max-kernels-per-client", "32", pool_size=3).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def small():
    """A daemon with small upload limits: 1 MiB a file, 3 MiB a kernel."""
    d = Daemon("--max-upload-size", "1M", "--disk-quota", "3M", "--max-message-size", "4M", pool_size=1).start()
    try:
        yield d
    finally:
        d.stop()


def call(daemon, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 10.0):
    """(status, lower-case headers, body bytes); the path goes on the wire exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def json_error(status_headers_body, status: int) -> dict:
    got, headers, data = status_headers_body
    assert got == status, (got, data[:300])
    assert headers["content-type"] == "application/json"
    body = json.loads(data)
    assert body["status"] == status and body["message"]
    return body


def multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> tuple[bytes, dict]:
    """(body, headers) for a form of (name, filename or None, value) fields."""
    out = []
    for name, filename, value in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def run(client: Client, code: str) -> str:
    reply, outputs = client.execute(code)
    assert reply["status"] == "ok", reply
    return stdout_of(outputs)


def kernel(daemon) -> tuple[str, Client]:
    kid = daemon.new_kernel()
    return kid, Client(daemon, kid)


LIST_ALL = "import os\nprint(sorted(os.path.join(r, f) for r, ds, fs in os.walk('.') for f in fs + ds))"


# -- round trips ---------------------------------------------------------------------


def test_put_binary_then_kernel_reads_and_overwrites_it(daemon):
    kid, c = kernel(daemon)
    data = os.urandom(300_000) + bytes(range(256))
    status, _, body = call(daemon, "PUT", f"/api/kernels/{kid}/files/in/data.bin", data)
    assert status == 201, body
    model = json.loads(body)
    assert model["path"] == "in/data.bin" and model["size"] == len(data)
    assert model["url"] == f"/api/kernels/{kid}/files/in/data.bin"
    out = run(c, "import hashlib\nprint(hashlib.sha256(open('in/data.bin', 'rb').read()).hexdigest())")
    assert out.strip() == hashlib.sha256(data).hexdigest()
    # The code may change, replace and delete what was uploaded.
    out = run(
        c,
        "import os\n"
        "with open('in/data.bin', 'r+b') as f: f.write(b'XY')\n"
        "print(open('in/data.bin', 'rb').read(4) == b'XY' + bytes([" + ",".join(map(str, data[2:4])) + "]))\n"
        "open('in/data.bin', 'wb').write(b'new')\n"
        "st = os.stat('in/data.bin'); print(st.st_uid == os.getuid(), oct(st.st_mode & 0o777))",
    )
    assert out.splitlines()[0] == "True"
    if os.geteuid() == 0:  # a root daemon hands its uploads to the worker account
        assert out.splitlines()[1] == "True 0o660"
    status, _, body = call(daemon, "GET", f"/api/kernels/{kid}/files/in/data.bin")
    assert status == 200 and body == b"new"
    status, _, _ = call(daemon, "POST", f"/api/kernels/{kid}/files/in/data.bin", b"posted")
    assert status == 201
    assert (
        run(c, "import os\nprint(open('in/data.bin').read()); os.remove('in/data.bin'); print(os.listdir('in'))")
        == "posted\n[]\n"
    )


def test_multipart_upload_for_the_widget(daemon):
    kid, c = kernel(daemon)
    payload = os.urandom(200_000)
    body, headers = multipart([("file", "plot data.bin", payload)])
    status, _, answer = call(daemon, "POST", f"/api/kernels/{kid}/files/", body, headers)
    assert status == 201, answer
    assert json.loads(answer)["path"] == "plot data.bin"
    # the path field may come after the file; browsers' fake paths are cut
    body, headers = multipart([("file", "ignored.bin", payload[:1000]), ("path", None, b"sub/dir/x.bin")])
    status, _, answer = call(daemon, "POST", f"/api/kernels/{kid}/files/", body, headers)
    assert status == 201 and json.loads(answer)["path"] == "sub/dir/x.bin", answer
    body, headers = multipart([("note", None, b"hello"), ("file", "C:\\fakepath\\y.txt", b"why")])
    status, _, answer = call(daemon, "POST", f"/api/kernels/{kid}/files/sub/", body, headers)
    assert status == 201 and json.loads(answer)["path"] == "sub/y.txt", answer
    out = run(
        c,
        "import hashlib\n"
        "print(hashlib.sha256(open('plot data.bin', 'rb').read()).hexdigest())\n"
        "print(hashlib.sha256(open('sub/dir/x.bin', 'rb').read()).hexdigest())\n"
        "print(open('sub/y.txt').read())",
    )
    assert out.split() == [hashlib.sha256(payload).hexdigest(), hashlib.sha256(payload[:1000]).hexdigest(), "why"]


def test_kernel_writes_then_download_with_ranges(daemon):
    kid, c = kernel(daemon)
    out = run(
        c,
        "import hashlib, random\n"
        "data = bytes(range(256)) * 1000 + random.randbytes(1000)\n"
        "open('out.bin', 'wb').write(data)\n"
        "print(hashlib.sha256(data).hexdigest())",
    )
    status, headers, body = call(daemon, "GET", f"/api/kernels/{kid}/files/out.bin")
    assert status == 200 and len(body) == 257_000
    assert hashlib.sha256(body).hexdigest() == out.strip()
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"].startswith('attachment; filename="out.bin"')
    assert headers["accept-ranges"] == "bytes"
    status, headers, part = call(
        daemon, "GET", f"/api/kernels/{kid}/files/out.bin", headers={"Range": "bytes=1000-1999"}
    )
    assert status == 206 and part == body[1000:2000]
    assert headers["content-range"] == "bytes 1000-1999/257000" and headers["content-length"] == "1000"
    status, _, tail = call(daemon, "GET", f"/api/kernels/{kid}/files/out.bin", headers={"Range": "bytes=-10"})
    assert status == 206 and tail == body[-10:]
    status, headers, empty = call(daemon, "HEAD", f"/api/kernels/{kid}/files/out.bin")
    assert status == 200 and headers["content-length"] == "257000" and empty == b""
    # SageMathCell's URL serves the same file
    status, _, same = call(daemon, "GET", f"/kernel/{kid}/files/out.bin")
    assert status == 200 and same == body


def test_content_type_and_disposition(daemon):
    kid, c = kernel(daemon)
    run(
        c,
        "open('a.png', 'wb').write(b'\\x89PNG\\r\\n\\x1a\\n')\n"
        "open('b.csv', 'w').write('x,y\\n')\n"
        "open('c.html', 'w').write('<script>alert(1)</script>')\n"
        "open('d.csv.gz', 'wb').write(b'\\x1f\\x8b')\n"
        "open('r\u00e9sum\u00e9 \"1\".txt', 'w').write('hi')",
    )
    base = f"/api/kernels/{kid}/files/"
    _, h, _ = call(daemon, "GET", base + "a.png")
    assert h["content-type"] == "image/png" and h["content-disposition"].startswith("inline")
    _, h, _ = call(daemon, "GET", base + "a.png?download=1")
    assert h["content-disposition"].startswith("attachment")
    _, h, _ = call(daemon, "GET", base + "b.csv")
    assert h["content-type"] == "text/csv; charset=utf-8" and h["content-disposition"].startswith("attachment")
    _, h, _ = call(daemon, "GET", base + "c.html")
    assert h["content-type"] == "text/html; charset=utf-8" and h["content-disposition"].startswith("attachment")
    _, h, _ = call(daemon, "GET", base + "c.html?inline=1")
    assert h["content-disposition"].startswith("inline")
    assert h["content-security-policy"] == "sandbox allow-scripts" and h["x-content-type-options"] == "nosniff"
    _, h, body = call(daemon, "GET", base + "d.csv.gz")
    assert "content-encoding" not in h and body == b"\x1f\x8b"
    status, h, body = call(daemon, "GET", base + "r%C3%A9sum%C3%A9%20%221%22.txt")
    assert status == 200 and body == b"hi"
    assert (
        h["content-disposition"]
        == "attachment; filename=\"r_sum_ _1_.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%221%22.txt"
    )


def test_listing_is_recursive_bounded_and_hides_dot_files(daemon):
    kid, c = kernel(daemon)
    run(
        c,
        "import os\n"
        "open('a.txt', 'w').write('aaa')\n"
        "os.makedirs('sub/deeper'); open('sub/deeper/b.txt', 'w').write('b')\n"
        "open('.hidden', 'w').write('h')\n"
        "os.makedirs('/'.join('d%d' % i for i in range(12))); open('/'.join('d%d' % i for i in range(12)) + '/far.txt', 'w')",
    )
    status, _, body = call(daemon, "GET", f"/api/kernels/{kid}/files/")
    assert status == 200
    listing = json.loads(body)
    paths = [f["path"] for f in listing["files"]]
    assert paths == ["a.txt", "sub/deeper/b.txt"] and listing["truncated"] is True
    a = listing["files"][0]
    assert a["size"] == 3 and a["url"] == f"/api/kernels/{kid}/files/a.txt" and abs(a["mtime"] - time.time()) < 60
    status, _, body = call(daemon, "GET", f"/api/kernels/{kid}/files/sub/")
    assert [f["path"] for f in json.loads(body)["files"]] == ["sub/deeper/b.txt"]
    status, _, body = call(daemon, "GET", f"/kernel/{kid}/files")
    assert json.loads(body)["files"][0]["url"] == f"/kernel/{kid}/files/a.txt"
    status, _, body = call(daemon, "GET", f"/api/kernels/{kid}/files/.hidden")
    assert status == 200 and body == b"h"
    run(c, "import os\nfor i in range(1100): open('many%04d' % i, 'w')")
    listing = json.loads(call(daemon, "GET", f"/api/kernels/{kid}/files/")[2])
    assert len(listing["files"]) == 1000 and listing["truncated"] is True


# -- attacks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "../../../../etc/passwd",
        "%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "sub/./x",
        "a%00b",
    ],
)
def test_traversal_is_refused(daemon, path):
    kid = daemon.new_kernel()
    json_error(call(daemon, "GET", f"/api/kernels/{kid}/files/{path}"), 400)
    json_error(call(daemon, "PUT", f"/api/kernels/{kid}/files/{path}", b"evil"), 400)
    json_error(call(daemon, "GET", f"/kernel/{kid}/files/{path}"), 400)


def test_upload_cannot_escape(daemon):
    kid, c = kernel(daemon)
    json_error(call(daemon, "PUT", f"/api/kernels/{kid}/files/%2e%2e/evil", b"evil"), 400)
    for path in (b"../evil", b"/tmp/evil", b"a/../../evil", b""):
        body, headers = multipart([("file", "x", b"evil"), ("path", None, path)])
        got = call(daemon, "POST", f"/api/kernels/{kid}/files/", body, headers)
        if path:
            json_error(got, 400)
        else:
            assert got[0] == 201 and json.loads(got[2])["path"] == "x"  # empty path: the file's own name
    run(c, "import os\nos.symlink('/tmp', 'tmplink')")
    json_error(call(daemon, "PUT", f"/api/kernels/{kid}/files/tmplink/evil", b"evil"), 409)
    out = run(c, "import os\nprint(os.path.exists('../evil'), os.path.exists('/tmp/evil'), sorted(os.listdir('.')))")
    assert out == "False False ['tmplink', 'x']\n"


def test_symlinks_out_of_the_dir_are_refused(daemon):
    kid, c = kernel(daemon)
    other, oc = kernel(daemon)
    other_dir = run(oc, "import os\nopen('secret.txt', 'w').write('other kernel secret')\nprint(os.getcwd())").strip()
    assert call(daemon, "GET", f"/api/kernels/{other}/files/secret.txt")[2] == b"other kernel secret"
    out = run(
        c,
        "import os\n"
        "open('real.txt', 'w').write('inside')\n"
        "os.symlink('/etc/passwd', 'pw')\n"
        "os.symlink('/etc', 'etcdir')\n"
        "os.symlink('../../..', 'up')\n"
        f"os.symlink({other_dir!r}, 'other')\n"
        f"os.symlink(os.path.relpath({other_dir!r}), 'other_rel')\n"
        "os.symlink(os.path.abspath('real.txt'), 'abs')\n"
        "os.makedirs('sub'); os.symlink('../real.txt', 'sub/inside')\n"
        "os.symlink('sub/inside', 'twice')\n"
        "os.symlink('loop', 'loop')\n"
        "try:\n    os.link('/etc/passwd', 'hard'); print('linked')\nexcept OSError:\n    print('refused')",
    )
    base = f"/api/kernels/{kid}/files/"
    for path in (
        "pw",
        "etcdir/passwd",
        "up/etc/passwd",
        "other/secret.txt",
        "other_rel/secret.txt",
        "other/",
        "abs",
        "loop",
    ):
        got = call(daemon, "GET", base + path)
        json_error(got, 403)
        assert b"root:" not in got[2] and b"secret" not in got[2]
    # links that stay inside are followed
    assert call(daemon, "GET", base + "sub/inside")[2] == b"inside"
    assert call(daemon, "GET", base + "twice")[2] == b"inside"
    if out.strip() == "linked":  # only where fs.protected_hardlinks is off
        json_error(call(daemon, "GET", base + "hard"), 403)
    # the listing shows regular files only and follows no link
    listing = json.loads(call(daemon, "GET", base)[2])
    assert [f["path"] for f in listing["files"]] == ["real.txt"] + (["hard"] if out.strip() == "linked" else [])
    # another kernel's id reaches that kernel's files only, never this one's
    json_error(call(daemon, "GET", f"/api/kernels/{other}/files/real.txt"), 404)


def test_a_fifo_does_not_hang_the_daemon(daemon):
    kid, c = kernel(daemon)
    reply, outputs = c.execute("import os\nos.mkfifo('pipe')\nos.mkfifo('out.fifo')", timeout=10)
    assert reply["status"] == "ok"
    t0 = time.monotonic()
    json_error(call(daemon, "GET", f"/api/kernels/{kid}/files/pipe", timeout=5), 403)
    json_error(call(daemon, "GET", f"/api/kernels/{kid}/files/out.fifo?inline=1", timeout=5), 403)
    assert time.monotonic() - t0 < 2
    assert json.loads(call(daemon, "GET", f"/api/kernels/{kid}/files/", timeout=5)[2])["files"] == []
    assert call(daemon, "GET", "/api/status", timeout=5)[0] == 200


def test_unknown_kernel_is_404(daemon):
    kid = uuid.uuid4().hex
    for method, path in (
        ("GET", f"/api/kernels/{kid}/files/x"),
        ("GET", f"/api/kernels/{kid}/files/"),
        ("GET", f"/kernel/{kid}/files/x"),
    ):
        json_error(call(daemon, method, path), 404)
    json_error(call(daemon, "PUT", f"/api/kernels/{kid}/files/x", b"data"), 404)


# -- limits and malformed uploads ----------------------------------------------------------


def test_oversized_uploads_are_413_and_change_nothing(small):
    kid, c = kernel(small)
    before = run(c, LIST_ALL)
    base = f"/api/kernels/{kid}/files/"
    assert "1048576" in json_error(call(small, "PUT", base + "big.bin", os.urandom(1_500_000)), 413)["message"]
    json_error(call(small, "PUT", base + "huge.bin", b"\0" * (5 << 20)), 413)  # over the site's body limit
    body, headers = multipart([("file", "big.bin", os.urandom(1_500_000))])
    json_error(call(small, "POST", base, body, headers), 413)
    assert run(c, LIST_ALL) == before
    # the quota: three files fit, the fourth does not, and replacing one does
    for name in ("a", "b", "c"):
        assert call(small, "PUT", base + name, os.urandom(900_000))[0] == 201
    assert "quota" in json_error(call(small, "PUT", base + "d", os.urandom(900_000)), 413)["message"]
    body, headers = multipart([("file", "d", os.urandom(900_000))])
    json_error(call(small, "POST", base, body, headers), 413)
    assert call(small, "PUT", base + "a", os.urandom(900_000))[0] == 201
    body, headers = multipart([("file", "b", os.urandom(900_000))])
    assert call(small, "POST", base, body, headers)[0] == 201
    assert run(c, "import os\nprint(sorted(os.listdir('.')))") == "['a', 'b', 'c']\n"


def test_malformed_multipart_is_400_and_changes_nothing(small):
    kid, c = kernel(small)
    before = run(c, LIST_ALL)
    url = f"/api/kernels/{kid}/files/"
    good, _ = multipart([("file", "x.txt", b"data")])
    cases = [
        ({"Content-Type": "multipart/form-data"}, good),  # no boundary
        ({"Content-Type": "multipart/form-data; boundary=other"}, good),  # boundary not in the body
        ({"Content-Type": "multipart/form-data; boundary=b0undary"}, good[:-20]),  # truncated
        ({"Content-Type": "multipart/form-data; boundary=b0undary"}, b"--b0undary\r\nno header end"),
        ({"Content-Type": "multipart/form-data; boundary=b0undary"}, b"--b0undary\r\nX: y\r\n\r\ndata\r\n--b0undary--"),
        ({"Content-Type": "multipart/form-data; boundary=b0undary"}, multipart([("path", None, b"x.txt")])[0]),
        ({"Content-Type": "multipart/form-data; boundary=b0undary"}, multipart([("file", "", b"data")])[0]),
        (
            {"Content-Type": "multipart/form-data; boundary=b0undary"},
            multipart([("file", "a", b"1"), ("file", "b", b"2")])[0],
        ),
        ({"Content-Type": "multipart/form-data; boundary=b0undary"}, b"garbage"),
    ]
    for headers, body in cases:
        json_error(call(small, "POST", url, body, headers), 400)
    assert run(c, LIST_ALL) == before


# -- notification ---------------------------------------------------------------------------


def file_news(outputs: list[dict]) -> list[dict]:
    return [m for m in outputs if m["msg_type"] == "sagecell.files"]


def test_execution_reports_created_and_modified_files(daemon):
    kid, c = kernel(daemon)
    watcher = Client(daemon, kid)  # a second connection to the same session
    other_kid, other = kernel(daemon)
    req_code = "open('out.csv', 'w').write('a,b\\n')"
    reply, outputs = c.execute(req_code)
    news = file_news(outputs)
    assert len(news) == 1
    msg = news[0]
    assert msg["channel"] == "iopub"
    idle = [i for i, m in enumerate(outputs) if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"]
    assert outputs.index(msg) < idle[-1]
    files = msg["content"]["files"]
    assert [(f["path"], f["change"], f["size"]) for f in files] == [("out.csv", "created", 4)]
    assert files[0]["url"] == f"/api/kernels/{kid}/files/out.csv"
    assert call(daemon, "GET", files[0]["url"])[2] == b"a,b\n"
    # the other connection of this session saw it, with the same parent
    seen = []
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        m = watcher.recv(5)
        if m["msg_type"] == "sagecell.files":
            seen.append(m)
    assert seen and seen[0]["parent_header"]["msg_id"] == msg["parent_header"]["msg_id"]
    _, outputs = c.execute("open('out.csv', 'a').write('1,2\\n')")
    assert [(f["path"], f["change"]) for f in file_news(outputs)[0]["content"]["files"]] == [("out.csv", "modified")]
    _, outputs = c.execute("x = 1")
    assert file_news(outputs) == []
    # an upload is not news of the code's doing
    assert call(daemon, "PUT", f"/api/kernels/{kid}/files/up.txt", b"up")[0] == 201
    _, outputs = c.execute("y = 2")
    assert file_news(outputs) == []
    # another session hears nothing of this one's files
    other.ws.settimeout(0.3)
    leaked = []
    try:
        for _ in range(1000):  # until 0.3 s pass without a message
            m = json.loads(other.ws.recv())
            leaked.append(m["msg_type"])
    except websocket.WebSocketTimeoutException:
        pass
    assert other.ws.connected, "the other session's socket closed"
    assert "sagecell.files" not in leaked
    # a restart brings a fresh, empty dir: the same name is new again
    assert call(daemon, "POST", f"/api/kernels/{kid}/restart")[0] == 200
    _, outputs = c.execute("import os\nprint(os.listdir('.'))\nopen('out.csv', 'w').write('new')")
    assert stdout_of(outputs) == "[]\n"
    assert [(f["path"], f["change"]) for f in file_news(outputs)[0]["content"]["files"]] == [("out.csv", "created")]


def test_files_vanish_with_the_kernel(daemon):
    kid, c = kernel(daemon)
    workdir = run(c, "import os\nopen('keep.txt', 'w').write('x')\nprint(os.getcwd())").strip()
    assert os.path.exists(os.path.join(workdir, "keep.txt"))
    assert call(daemon, "DELETE", f"/api/kernels/{kid}")[0] == 204
    json_error(call(daemon, "GET", f"/api/kernels/{kid}/files/keep.txt"), 404)
    deadline = time.monotonic() + 5
    while os.path.exists(os.path.dirname(workdir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(os.path.dirname(workdir))


# -- 100 MB, streamed ------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class RssWatch:
    """The highest RSS of a process while the block runs, sampled every 5 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self.stop = threading.Event()

    def __enter__(self):
        self.base = rss_kib(self.pid)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_kib(self.pid))

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 1024


SIZE = 100_000_000  # 100 MB, under the default 100 MiB upload limit with room for multipart framing


@pytest.mark.slow
def test_100mb_streams_with_flat_daemon_memory(daemon):
    kid, c = kernel(daemon)
    pid = daemon.proc.pid
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "big.bin")
        digest = hashlib.sha256()
        with open(src, "wb") as f:
            block = os.urandom(1 << 20)
            for i in range(SIZE // len(block) + 1):
                chunk = block[: min(len(block), SIZE - i * len(block))]
                chunk = i.to_bytes(4, "big") + chunk[4:] if chunk else chunk
                digest.update(chunk)
                f.write(chunk)
        expected = digest.hexdigest()
        # warm up: the first request of a kind loads code and buffers
        call(daemon, "PUT", f"/api/kernels/{kid}/files/warm", b"w" * 200_000)
        call(daemon, "GET", f"/api/kernels/{kid}/files/warm")
        report = {}
        with RssWatch(pid) as up, open(src, "rb") as body:
            t0 = time.monotonic()
            status, _, answer = call(
                daemon, "PUT", f"/api/kernels/{kid}/files/big.bin", body, {"Content-Length": str(SIZE)}, timeout=60
            )
            report["upload_s"] = time.monotonic() - t0
        assert status == 201, answer
        out = run(
            c,
            "import hashlib\nh = hashlib.sha256()\nwith open('big.bin', 'rb') as f:\n"
            "    for b in iter(lambda: f.read(1 << 20), b''): h.update(b)\nprint(h.hexdigest())",
        )
        assert out.strip() == expected
        with RssWatch(pid) as down:
            t0 = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
            conn.request("GET", f"/api/kernels/{kid}/files/big.bin")
            resp = conn.getresponse()
            got = hashlib.sha256()
            n = 0
            while chunk := resp.read(1 << 20):
                got.update(chunk)
                n += len(chunk)
            conn.close()
            report["download_s"] = time.monotonic() - t0
        assert resp.status == 200 and n == SIZE and got.hexdigest() == expected
        # the widget's way: multipart, parsed as it streams from Twisted's temp file
        mp = os.path.join(tmp, "form")
        with open(mp, "wb") as f, open(src, "rb") as s:
            f.write(b'--zz\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n')
            while chunk := s.read(1 << 20):
                f.write(chunk)
            f.write(b"\r\n--zz--\r\n")
        with RssWatch(pid) as form, open(mp, "rb") as body:
            t0 = time.monotonic()
            headers = {"Content-Type": "multipart/form-data; boundary=zz", "Content-Length": str(os.path.getsize(mp))}
            status, _, answer = call(daemon, "POST", f"/api/kernels/{kid}/files/", body, headers, timeout=60)
            report["multipart_s"] = time.monotonic() - t0
        assert status == 201 and json.loads(answer)["size"] == SIZE, answer
        assert run(c, "import os\nprint(os.path.getsize('big.bin'))").strip() == str(SIZE)
    mb = SIZE / 1e6
    print(
        f"\n100 MB: upload {mb / report['upload_s']:.0f} MB/s (RSS +{up.growth_mib:.1f} MiB), "
        f"download {mb / report['download_s']:.0f} MB/s (RSS +{down.growth_mib:.1f} MiB), "
        f"multipart {mb / report['multipart_s']:.0f} MB/s (RSS +{form.growth_mib:.1f} MiB)"
    )
    for watch in (up, down, form):
        assert watch.growth_mib <= 16, watch.growth_mib
