# -*- test-case-name: tests.test_statics -*-
"""
How the widget's files are sent: compressed, and cached as long as their
names allow.

The build (js/build.mjs) writes ``name.br`` and ``name.gz`` beside each text
file, compressed once at the best levels; a client that accepts brotli or
gzip gets that file as is, so serving costs no CPU. A file whose name carries
a content hash (``widgets-OVX5CSPE.js``) never changes under that name: it is
cached for a year, ``immutable``. Any other file (``embedded_sagecell.js``,
whose URL pages hard-code) is cached briefly and revalidated with its ETag or
Last-Modified, which answer 304 when nothing changed.
"""

from __future__ import annotations

import os
import re

from twisted.web import http, static

#: esbuild's ``[name]-[hash]``: eight or more capitals and digits before the extension
HASHED = re.compile(r"-[A-Z0-9]{8,}\.[a-z0-9]+$")
IMMUTABLE = b"public, max-age=31536000, immutable"
SHORT = b"public, max-age=300"
#: preferred first; the file suffix the build writes, and the Content-Encoding it is sent with
ENCODINGS = (("br", ".br"), ("gzip", ".gz"))


def accepted(header: bytes | None) -> set[str]:
    """The content codings an Accept-Encoding header allows (those with q=0 left out)."""
    found = set()
    for item in (header or b"").decode("latin-1").split(","):
        name, _, params = item.strip().partition(";")
        q = params.strip()
        if q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"):
            continue
        if name.strip():
            found.add(name.strip().lower())
    return found


def etag_of(path: str, coding: str = "") -> bytes:
    """A validator from the file's modification time and size, and the coding it is sent in."""
    st = os.stat(path)
    suffix = f"-{coding}" if coding else ""
    return f'"{st.st_mtime_ns:x}-{st.st_size:x}{suffix}"'.encode()


class CompressedFile(static.File):
    """
    A static file sent compressed where the build made a compressed copy and
    the client accepts it, with caching headers that follow its name.
    """

    def render_GET(self, request):
        self.restat(False)
        if not self.exists() or self.isdir():
            return super().render_GET(request)
        request.setHeader(b"cache-control", IMMUTABLE if HASHED.search(self.basename()) else SHORT)
        variant, coding = self._variant(request)
        if variant is None:
            if request.setETag(etag_of(self.path)) is http.CACHED:
                return b""
            return super().render_GET(request)
        if request.setETag(etag_of(variant.path, coding)) is http.CACHED:
            return b""
        return static.File.render_GET(variant, request)

    render_HEAD = render_GET

    def _variant(self, request):
        """(the compressed copy to send, its coding), or (None, "") to send the file as it is."""
        if self.type is None:
            self.type, self.encoding = static.getTypeAndEncoding(
                self.basename(), self.contentTypes, self.contentEncodings, self.defaultType
            )
        codings = [(c, s) for c, s in ENCODINGS if os.path.isfile(self.path + s)]
        if not codings or self.encoding:
            return None, ""
        request.setHeader(b"vary", b"accept-encoding")
        wanted = accepted(request.getHeader(b"accept-encoding"))
        for coding, suffix in codings:
            if coding in wanted:
                variant = static.File(self.path + suffix)
                variant.type, variant.encoding = self.type, coding
                return variant, coding
        return None, ""
