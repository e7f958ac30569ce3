"""
The package's layout holds: each subpackage runs in one process, and imports
only what its process has (the README's "Layout" section says the same).

Walks every module's imports, those inside functions too, so a late
``from ..web import x`` breaks the rule as surely as one at the top.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sagecell_tw")

#: modules at the top of the package: every process may import them; they import none of the package
BASE = {"accounts", "config", "keys", "logs", "messages"}

#: room -> the rooms it may import (besides itself and BASE). The daemon is tap, daemon, web, core, control;
#: the spawner is worker (and files); the kernel is kernel.
MAY_IMPORT = {
    "tap": {"daemon", "web", "core", "control", "files"},
    "daemon": {"web", "core", "control", "files"},
    "web": {"core", "control", "files"},
    "core": set(),
    "control": {"files"},
    "files": set(),
    "worker": {"kernel", "files"},
    "kernel": set(),
}

#: rooms that run where no reactor is (the spawner, a kernel, a file command): no Twisted, Autobahn or txzmq
NO_TWISTED = {"files", "kernel", "worker", "accounts", "config", "messages"}
TWISTED = ("twisted", "autobahn", "txzmq")
#: rooms that may run before a fork or in plain model code: no zmq either
NO_ZMQ = {"files", "accounts", "config", "messages"}


def modules() -> list[tuple[str, str]]:
    """(dotted name inside the package, path) of every module."""
    found = []
    for dirpath, dirnames, filenames in os.walk(PACKAGE):
        dirnames[:] = [d for d in dirnames if d not in ("static", "__pycache__")]
        for f in filenames:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                found.append((rel, path))
    return sorted(found)


def room_of(name: str) -> str:
    """The room a module (dotted, inside the package) lives in: its subpackage, or its own name at the top."""
    first = name.split(".")[0]
    return "" if first == "__init__" else first


def imports_of(name: str, path: str) -> list[tuple[str, int]]:
    """(absolute dotted module, line) of every import in the file, relative ones resolved."""
    tree = ast.parse(open(path).read(), path)
    package = ["sagecell_tw", *name.split(".")[:-1]]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            # "from . import x" names modules too
            out += [(f"{mod}.{alias.name}", node.lineno) for alias in node.names]
    return out


def inside(mod: str) -> str | None:
    """The module's dotted name inside the package if it is ours and is a module, else None."""
    if mod != "sagecell_tw" and not mod.startswith("sagecell_tw."):
        return None
    rest = mod[len("sagecell_tw.") :] if mod != "sagecell_tw" else ""
    if not rest:
        return ""
    parts = rest.split(".")
    for n in range(len(parts), 0, -1):
        candidate = os.path.join(PACKAGE, *parts[:n])
        if os.path.isfile(candidate + ".py") or os.path.isdir(candidate):
            return ".".join(parts[:n])
    return None  # a name imported from a module, not a module


def broken_rules() -> list[str]:
    broken = []
    for name, path in modules():
        room = room_of(name)
        for mod, line in imports_of(name, path):
            where = f"sagecell_tw/{name.replace('.', '/')}.py:{line} imports {mod}"
            top = mod.split(".")[0]
            if top in TWISTED and room in NO_TWISTED:
                broken.append(f"{where}: {room} runs without a reactor")
            if top in ("zmq", "txzmq") and room in NO_ZMQ:
                broken.append(f"{where}: {room} creates no zmq")
            target = inside(mod)
            if target is None:
                continue
            to = room_of(target)
            if to in ("", room):
                continue  # the package's face (its version, its source root), or its own room
            if room in BASE or room == "":
                broken.append(f"{where}: the base imports nothing of the package")
            elif to not in BASE and to not in MAY_IMPORT[room]:
                broken.append(f"{where}: {room} may not import {to}")
    return broken


def test_every_module_is_in_a_known_room():
    rooms = {room_of(name) for name, _ in modules()}
    assert rooms <= set(MAY_IMPORT) | BASE | {""}, rooms - set(MAY_IMPORT) - BASE


def test_imports_follow_the_layout():
    assert broken_rules() == []


def test_the_rule_sees_a_late_upward_import(tmp_path):
    """The walk finds an import inside a function, and judges it: core importing web is refused."""
    pkg = tmp_path / "sagecell_tw"
    (pkg / "core").mkdir(parents=True)
    (pkg / "web").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "web" / "__init__.py").write_text("")
    (pkg / "web" / "policy.py").write_text("")
    (pkg / "core" / "sessions.py").write_text("def f():\n    from ..web import policy\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, str(pkg)
    try:
        assert broken_rules() == [
            "sagecell_tw/core/sessions.py:2 imports sagecell_tw.web: core may not import web",
            "sagecell_tw/core/sessions.py:2 imports sagecell_tw.web.policy: core may not import web",
        ]
    finally:
        PACKAGE = saved


@pytest.mark.parametrize("string", ["sagecell_tw.tap", "sagecell_tw.worker.spawner", "sagecell_tw.worker.zygote"])
def test_module_names_used_at_run_time_exist(string):
    """The twistd plugin, the spawner's argv and the zygote's exec name modules as strings."""
    parts = string.split(".")[1:]
    assert os.path.isfile(os.path.join(PACKAGE, *parts) + ".py"), string


def test_each_module_names_tests_that_exist():
    """``# -*- test-case-name: ... -*-`` on a module's first line names test modules that exist."""
    wrong = []
    for name, path in modules():
        if name.endswith("__init__"):
            continue
        first = open(path).readline()
        m = re.match(r"# -\*- test-case-name: ([\w.,]+) -\*-$", first.strip())
        if not m:
            wrong.append(f"{name}: no test-case-name header")
            continue
        for test in m.group(1).split(","):
            if not os.path.isfile(os.path.join(ROOT, *test.split(".")) + ".py"):
                wrong.append(f"{name}: {test} does not exist")
    assert wrong == []
