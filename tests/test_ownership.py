"""
A session belongs to whoever created it: the hostile visitor's tests.

Visitor A creates a kernel (and a notebook session) and keeps a secret in
it; visitor B, on the same daemon, tries everything a visitor can read,
list or guess to reach it. Trust model (``policy.Policy``):

- Anonymous (no ``--token``): a kernel's id, and a notebook session's id,
  is the capability to use it: 128 random bits, answered only to its
  creator. Nothing lists kernels or sessions (403, as Kernel Gateway's
  ``list_kernels = False``); any id B makes up or finds in a public answer
  gets 404 on every per-kernel route, the same 404 as an id that never
  existed. Whoever A gives the id to can use the kernel: that is the
  capability (SageMathCell's model), tested here too.
- ``--token``: whoever holds the token is trusted with everything, as a
  Jupyter Server user is: listings work with the token.

Also here: notebook sessions are freed with their kernel and capped per
client, permalinks need the token on a token daemon and are rate-limited,
``?token=`` never reaches a log, and ``/static/`` lists nothing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import secrets
import time
import urllib.parse
import uuid

import pytest
import websocket
from support import Client, Daemon, stdout_of
from test_sagecell_compat import World

TOKEN = "t0ken-" + secrets.token_hex(8)
SECRET = "victim-secret-" + secrets.token_hex(8)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
PERMALINKS_PER_MINUTE = 5
MAX_PER_CLIENT = 4


# -- daemons ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anon():
    """An anonymous daemon (no token), as public SageMathCell-style services run."""
    d = Daemon(pool_size=2, permalinks_per_minute=PERMALINKS_PER_MINUTE, max_kernels_per_client=MAX_PER_CLIENT).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def tokened():
    d = Daemon(pool_size=1, token=TOKEN).start()
    try:
        yield d
    finally:
        d.stop()


def with_token(headers: dict | None = None) -> dict:
    return {**(headers or {}), "Authorization": f"token {TOKEN}"}


@pytest.fixture(scope="module")
def victim(anon):
    """
    Visitor A: a kernel holding ``SECRET`` (a variable and a file), a notebook
    session on another kernel, and the id of a kernel A has shut down.
    """
    kid = anon.new_kernel()
    a = Client(anon, kid)
    reply, _ = a.execute(f"SECRET = {SECRET!r}\nopen('secret.txt', 'w').write(SECRET)")
    assert reply["status"] == "ok", reply
    status, nb, _ = anon.request(
        "POST", "/api/sessions", {"path": "a.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
    )
    assert status == 201, (status, nb)
    ended = anon.new_kernel()
    assert anon.request("DELETE", f"/api/kernels/{ended}")[0] == 204
    try:
        yield {"kernel": kid, "client": a, "session": nb["id"], "session_kernel": nb["kernel"]["id"], "ended": ended}
    finally:
        a.close()
        anon.request("DELETE", f"/api/sessions/{nb['id']}")
        anon.request("DELETE", f"/api/kernels/{kid}")


# -- what a visitor can read or list --------------------------------------------------------

#: every GET a visitor can make without knowing an id
PUBLIC = [
    "/api/kernels",
    "/api/sessions",
    "/api/status",
    "/api",
    "/api/kernelspecs",
    "/healthz",
    "/healthz/live",
    "/metrics",
]


def harvest(d: Daemon) -> set[str]:
    """Every 32-hex-digit string in every public answer: what visitor B can learn without being given anything."""
    found: set[str] = set()
    for path in PUBLIC:
        _, body, _ = d.request("GET", path)
        text = body.decode(errors="replace") if isinstance(body, bytes) else json.dumps(body)
        found |= set(re.findall(r"[0-9a-f]{32}", text))
    return found


@pytest.mark.parametrize("path", ["/api/kernels", "/api/sessions"])
def test_anonymous_listings_are_refused(anon, victim, path):
    status, body, headers = anon.request("GET", path)
    assert status == 403, (status, body)
    assert headers["Content-Type"] == "application/json" and body["status"] == 403
    assert "does not list" in body["message"]
    assert victim["kernel"] not in json.dumps(body)


def test_no_public_answer_names_a_kernel_or_session(anon, victim):
    found = harvest(anon)
    for what in ("kernel", "session", "session_kernel"):
        assert victim[what] not in found, what


# -- every per-kernel route: B's guesses ----------------------------------------------------


def near_misses(victim) -> list[str]:
    """Ids B could make up: random ones, A's with one digit changed or in capitals, a uuid4, one that ended."""
    kid = victim["kernel"]
    flipped = kid[:-1] + ("0" if kid[-1] != "0" else "1")
    return [secrets.token_hex(16), uuid.uuid4().hex, flipped, kid.upper(), kid + "0", victim["ended"], "..", "%2e%2e"]


def candidates(anon, victim) -> list[str]:
    """B's guesses, and every id B can find in a public answer (today's listings gave A's away)."""
    return near_misses(victim) + sorted(harvest(anon))


KERNEL_ROUTES = [
    ("GET", "/api/kernels/{id}", None),
    ("DELETE", "/api/kernels/{id}", None),
    ("POST", "/api/kernels/{id}/interrupt", None),
    ("POST", "/api/kernels/{id}/restart", None),
    ("GET", "/api/kernels/{id}/channels", None),
    ("GET", "/api/kernels/{id}/files/", None),
    ("GET", "/api/kernels/{id}/files/secret.txt", None),
    ("PUT", "/api/kernels/{id}/files/planted.txt", b"planted"),
    ("GET", "/kernel/{id}/files/secret.txt", None),
    ("GET", "/kernel/{id}/channels", None),
    ("DELETE", "/kernel/{id}", None),
    ("POST", "/kernel/{id}?method=DELETE", b""),
    ("POST", "/api/sessions", "kernel"),
    ("GET", "/api/sessions/{id}", None),
    ("PATCH", "/api/sessions/{id}", {"path": "stolen.ipynb"}),
    ("DELETE", "/api/sessions/{id}", None),
]


@pytest.mark.parametrize(("method", "path", "body"), KERNEL_ROUTES, ids=[f"{m} {p}" for m, p, _ in KERNEL_ROUTES])
def test_a_guessed_id_is_404_on_every_route(anon, victim, method, path, body):
    for guess in candidates(anon, victim):
        quoted = urllib.parse.quote(guess, safe="%")
        raw = body if isinstance(body, bytes) else None
        payload = (
            {"kernel": {"id": guess}, "path": "x.ipynb"}
            if body == "kernel"
            else (body if isinstance(body, dict) else None)
        )
        status, answer, headers = anon.request(
            method, path.format(id=quoted), body=payload, raw=raw, headers=FORM if raw == b"" else None
        )
        assert status == 404, (method, path, guess, status, answer)
        assert headers["Content-Type"] == "application/json" and answer["status"] == 404, answer
    # A's kernel is untouched: still running, its secret and nothing planted.
    reply, out = victim["client"].execute("import os\nprint(SECRET, os.path.exists('planted.txt'))")
    assert reply["status"] == "ok" and stdout_of(out) == f"{SECRET} False\n"


@pytest.mark.parametrize("path", ["/api/kernels/{id}/channels", "/kernel/{id}/channels"])
def test_a_guessed_id_opens_no_websocket(anon, victim, path):
    for guess in candidates(anon, victim):
        url = anon.ws_url + path.format(id=urllib.parse.quote(guess, safe="%"))
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            ws = websocket.create_connection(url, timeout=10)
            ws.close()  # reached only if the daemon let B in
        assert e.value.status_code == 404, (guess, e.value)


def test_the_id_is_the_capability(anon, victim):
    """Whoever A gives its kernel's id to may use it: that is what the id grants (as in SageMathCell)."""
    friend = Client(anon, victim["kernel"])
    try:
        reply, out = friend.execute("print(SECRET)")
        assert reply["status"] == "ok" and stdout_of(out) == f"{SECRET}\n"
    finally:
        friend.close()
    status, data, _ = anon.request("GET", f"/kernel/{victim['kernel']}/files/secret.txt")
    assert status == 200 and data == SECRET.encode()
    status, model, _ = anon.request("GET", f"/api/sessions/{victim['session']}")
    assert status == 200 and model["kernel"]["id"] == victim["session_kernel"]


# -- notebook sessions ----------------------------------------------------------------------


def test_notebook_sessions_go_with_their_kernel(anon):
    status, nb, _ = anon.request("POST", "/api/sessions", {"path": "b.ipynb", "kernel": {"name": "python3"}})
    assert status == 201, nb
    kid = nb["kernel"]["id"]
    # A second notebook session on the same kernel (a console next to a notebook).
    status, other, _ = anon.request("POST", "/api/sessions", {"path": "c.ipynb", "kernel": {"id": kid}})
    assert status == 201 and other["kernel"]["id"] == kid
    assert anon.request("DELETE", f"/api/kernels/{kid}")[0] == 204
    for sid in (nb["id"], other["id"]):
        status, body, _ = anon.request("GET", f"/api/sessions/{sid}")
        assert status == 404, body


def test_notebook_sessions_are_capped_per_client(anon):
    kid = anon.new_kernel()
    made = []
    try:
        for _ in range(MAX_PER_CLIENT):
            status, nb, _ = anon.request("POST", "/api/sessions", {"path": "d.ipynb", "kernel": {"id": kid}})
            if status == 429:
                break  # the module's other sessions count too
            assert status == 201, nb
            made.append(nb["id"])
        status, body, headers = anon.request("POST", "/api/sessions", {"path": "d.ipynb", "kernel": {"id": kid}})
        assert status == 429 and headers["Content-Type"] == "application/json"
        assert f"{MAX_PER_CLIENT} notebook sessions" in body["message"]
        # Deleting a kernel frees its sessions, and with them room for new ones.
        assert anon.request("DELETE", f"/api/kernels/{kid}")[0] == 204
        kid = anon.new_kernel()
        status, nb, _ = anon.request("POST", "/api/sessions", {"path": "d.ipynb", "kernel": {"id": kid}})
        assert status == 201, nb
    finally:
        anon.request("DELETE", f"/api/kernels/{kid}")


def test_culled_kernels_take_their_notebook_sessions_along():
    """In memory (task.Clock): a kernel ended by the daemon (no browser for --disconnect-timeout) frees its sessions."""
    w = World(token=TOKEN, disconnect_timeout=30)
    auth = with_token()
    status, nb, _ = w.call(
        "POST", "/api/sessions", body={"path": "e.ipynb", "kernel": {"name": "python3"}}, headers=auth
    )
    assert status == 201
    assert [s["id"] for s in w.call("GET", "/api/sessions", headers=auth)[1]] == [nb["id"]]
    w.clock.advance(31)
    w.sessions.sweep()
    assert w.call("GET", "/api/sessions", headers=auth)[1] == []
    assert w.call("GET", f"/api/sessions/{nb['id']}", headers=auth)[0] == 404
    assert not w.api.notebooks.models and not w.api.notebooks.by_client


def test_ids_carry_128_random_bits():
    """Kernel and notebook-session ids: 32 hex digits, all random (a uuid4 fixes 6 bits: its version digit is always 4)."""
    w = World(max_kernels=200, max_kernels_per_client=200)
    kernels = [w.call("POST", "/api/kernels", body={})[1]["id"] for _ in range(24)]
    sessions = [w.call("POST", "/api/sessions", body={"kernel": {"id": k}})[1]["id"] for k in kernels]
    for ids in (kernels, sessions):
        assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
        assert {i[12] for i in ids} != {"4"}, "uuid4 ids: 122 random bits"


# -- with a token ---------------------------------------------------------------------------


def test_token_holders_see_every_kernel(tokened):
    status, nb, _ = tokened.request(
        "POST", "/api/sessions", {"path": "t.ipynb", "kernel": {"name": "python3"}}, headers=with_token()
    )
    assert status == 201, nb
    try:
        status, kernels, _ = tokened.request("GET", "/api/kernels", headers=with_token())
        assert status == 200 and nb["kernel"]["id"] in [k["id"] for k in kernels]
        status, sessions, _ = tokened.request("GET", "/api/sessions", headers=with_token())
        assert status == 200 and nb["id"] in [s["id"] for s in sessions]
        for path in ("/api/kernels", "/api/sessions"):
            assert tokened.request("GET", path)[0] == 403
    finally:
        tokened.request("DELETE", f"/api/sessions/{nb['id']}", headers=with_token())


# -- permalinks -----------------------------------------------------------------------------


def test_permalinks_need_the_token_on_a_token_daemon(tokened):
    form = urllib.parse.urlencode({"code": "print(1)"}).encode()
    for headers in (FORM, {**FORM, "Authorization": "token wrong"}):
        status, body, _ = tokened.request("POST", "/permalink", raw=form, headers=headers)
        assert status == 403 and "token" in body["message"], (status, body)
    status, made, _ = tokened.request("POST", "/permalink", raw=form, headers=with_token(FORM))
    assert status == 200 and set(made) >= {"query", "zip"}
    status, body, _ = tokened.request("GET", f"/permalink?q={made['query']}")
    assert status == 403, body
    status, body, _ = tokened.request("GET", f"/permalink?q={made['query']}", headers=with_token())
    assert status == 200 and body[0] == "print(1)"


def test_permalinks_are_rate_limited_per_client(anon):
    answers = []
    for i in range(PERMALINKS_PER_MINUTE + 3):
        form = urllib.parse.urlencode({"code": f"print({i})\n" + "#" * 100_000}).encode()
        answers.append(anon.request("POST", "/permalink", raw=form, headers=FORM))
    assert [a[0] for a in answers] == [200] * PERMALINKS_PER_MINUTE + [429] * 3
    status, body, headers = answers[-1]
    assert "a minute" in body["error"] and int(headers["Retry-After"]) >= 1
    # Reading is not limited: every stored one still answers.
    status, got, _ = anon.request("GET", f"/permalink?q={answers[0][1]['query']}")
    assert status == 200 and got[0].startswith("print(0)")


# -- logs and static files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def json_logged():
    d = Daemon(pool_size=1, token=TOKEN, log_json="true").start()
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.parametrize("which", ["tokened", "json_logged"])
def test_the_token_never_reaches_the_log(request, which):
    d = request.getfixturevalue(which)
    marker = secrets.token_hex(6)
    status, _, _ = d.request(
        "GET", f"/api/kernels?token={TOKEN}&mark={marker}", headers={"Referer": f"https://page.example/?token={TOKEN}"}
    )
    assert status == 200
    status, _, _ = d.request("GET", f"/api/status?%74oken={TOKEN}&mark={marker}")  # Twisted decodes the name
    assert status == 200
    status, body, _ = d.request("POST", f"/api/kernels?token={TOKEN}", {"name": "python3"})
    assert status == 201
    ws = websocket.create_connection(
        f"{d.ws_url}/api/kernels/{body['id']}/channels?token={TOKEN}&mark={marker}", timeout=10
    )
    ws.close()
    d.request("DELETE", f"/api/kernels/{body['id']}", headers=with_token())
    log = wait_for_log(d, marker, 2)
    assert TOKEN not in log
    assert "token=REDACTED" in log


def wait_for_log(d: Daemon, marker: str, lines: int, timeout: float = 10.0) -> str:
    """The daemon's log once ``lines`` access lines carrying ``marker`` are in (twistd writes them as requests end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = d.log()
        if log.count(marker) >= lines:
            return log
        time.sleep(0.05)
    raise AssertionError(f"the access log has no {lines} lines with {marker}:\n{d.log()[-3000:]}")


@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static",
        "/static/katex/",
        "/static/katex",
        "/static/nope.js",
        "/static/threejs-sage/",
        "/static/threejs-sage/r122/",
        "/static/threejs-sage/r1/three.min.js",
    ],
)
def test_static_lists_no_directory(anon, path):
    status, body, headers = anon.request("GET", path)
    assert status == 404, (status, body)
    assert headers["Content-Type"] == "application/json" and body["status"] == 404


def test_static_files_still_served(anon):
    status, data, headers = anon.request("GET", "/static/embed.js")
    assert status == 200 and len(data) > 1000
    assert headers["Access-Control-Allow-Origin"] == "*"


def test_threejs_of_sage_scenes_is_served_where_installed(anon):
    # The widget points Sage's 3D scenes here, not at a CDN (js/src/threejs.js).
    status, data, headers = anon.request("GET", "/static/threejs-sage/r122/three.min.js")
    if importlib.util.find_spec("jupyter_threejs_sage") is None:  # a Python-only install
        assert status == 404 and data["status"] == 404, (status, data)
        return
    assert status == 200 and b"REVISION" in data and b"OrbitControls" in data
    assert headers["Content-Type"].endswith("/javascript")
    assert headers["Access-Control-Allow-Origin"] == "*"


# -- the route table: what it does not name is a JSON 404 -----------------------------------


@pytest.mark.parametrize(
    "path",
    ["/nope", "/api/nope", "/api/kernelspecs/python3/extra", "/metrics/x", "/healthz/x", "/kernel/{id}/nope"],
)
def test_a_path_no_route_names_is_a_json_404(anon, victim, path):
    status, body, headers = anon.request("GET", path.format(id=victim["kernel"]))
    assert status == 404 and isinstance(body, dict) and body["status"] == 404, (status, body)
    assert headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("path", ["/metrics", "/healthz"])
def test_the_operator_routes_answer_other_methods_in_json(anon, path):
    status, body, headers = anon.request("DELETE", path)
    assert status == 405 and body["status"] == 405 and headers["Allow"] == "GET, HEAD", (status, body)
