# -*- test-case-name: tests.test_files,tests.test_remote_files -*-
"""
The JSON shapes of a kernel's files, the same whether the kernel runs on the
daemon's host or on a worker host: a file's model and a directory's listing.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import quote


def url_for(prefix: str, kernel_id: str, parts: list[str]) -> str:
    return f"{prefix}/{kernel_id}/files/" + quote("/".join(parts), safe="/")


def file_model(prefix: str, kernel_id: str, path: str, st) -> dict:
    """A file's JSON model; ``st`` has ``st_size`` and ``st_mtime`` (an ``os.stat_result``, a ``RemoteStat``)."""
    return {"path": path, "size": st.st_size, "mtime": st.st_mtime, "url": url_for(prefix, kernel_id, path.split("/"))}


def listing(prefix: str, kernel_id: str, dir_parts: list[str], found: dict, truncated: bool) -> dict:
    """A directory's JSON answer: ``found`` maps paths below ``dir_parts`` to stats, as for ``file_model``."""
    base = "/".join(dir_parts)
    base = base + "/" if base else ""
    return {"files": [file_model(prefix, kernel_id, base + p, st) for p, st in found.items()], "truncated": truncated}


class KernelDirs(Protocol):
    """
    A kernel's ``work/``, wherever it is: on the daemon's host
    (``web.files.LocalFiles``) or on a worker host (``control.files.RemoteFiles``).
    Errors a client caused are ``FileError``; results may come as Deferreds.
    """

    def get(self, kernel, parts: list[str], prefix: str, kernel_id: str):
        """A directory's listing (``listing``), or the file to send."""

    def upload(self, kernel, parts: list[str], body, boundary: bytes | None, max_upload: int, quota: int):
        """Store a raw body (``boundary`` None) or a multipart form's file: ``(parts, stat)``."""

    def scan(self, kernel):
        """Every file in ``work/``: path -> stat (``st_size``, ``st_mtime_ns``); None if it cannot be read."""
