"""
The widget's static files as a browser gets them (sagecell_tw/web/statics.py):
the build's brotli or gzip copy when the client accepts it, caching that
follows the file's name, and validators that answer 304.
"""

from __future__ import annotations

import gzip
import os
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import client, server
from twisted.web.http_headers import Headers

from sagecell_tw.web.site import StaticFiles

HASHED = "widgets-ABCD2345.js"
SOURCE = b"console.log('the widget code');\n" * 50
BROTLI = b"(stands for the brotli copy)"


class StaticFilesTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="sagecell-static-")
        self.addCleanup(lambda: [os.remove(os.path.join(self.dir, n)) for n in os.listdir(self.dir)])
        for name in (HASHED, "embed.js"):
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(SOURCE)
            with open(os.path.join(self.dir, name + ".gz"), "wb") as f:
                f.write(gzip.compress(SOURCE))
            with open(os.path.join(self.dir, name + ".br"), "wb") as f:
                f.write(BROTLI)
        with open(os.path.join(self.dir, "plain.css"), "wb") as f:
            f.write(b"body {}\n")
        root = StaticFiles(self.dir)
        root.indexNames = []
        self.port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.agent = client.Agent(reactor)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}/"

    @defer.inlineCallbacks
    def get(self, name, method=b"GET", **headers):
        hdrs = Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})
        resp = yield self.agent.request(method, (self.base + name).encode(), hdrs)
        body = yield client.readBody(resp)
        one = {k.decode().lower(): v[0].decode() for k, v in resp.headers.getAllRawHeaders()}
        return resp.code, one, body

    @defer.inlineCallbacks
    def test_brotli_where_accepted_then_gzip_then_as_is(self):
        code, headers, body = yield self.get(HASHED, accept_encoding="gzip, deflate, br")
        self.assertEqual((code, body, headers["content-encoding"]), (200, BROTLI, "br"))
        self.assertIn(headers["content-type"], ("text/javascript", "application/javascript"))
        self.assertEqual(headers["vary"], "accept-encoding")

        code, headers, body = yield self.get(HASHED, accept_encoding="gzip, br;q=0")
        self.assertEqual((code, headers["content-encoding"]), (200, "gzip"))
        self.assertEqual(gzip.decompress(body), SOURCE)

        code, headers, body = yield self.get(HASHED, accept_encoding="identity")
        self.assertEqual((code, body), (200, SOURCE))
        self.assertNotIn("content-encoding", headers)
        self.assertEqual(headers["vary"], "accept-encoding")

    @defer.inlineCallbacks
    def test_a_file_without_copies_is_sent_as_it_is(self):
        code, headers, body = yield self.get("plain.css", accept_encoding="gzip, br")
        self.assertEqual((code, body), (200, b"body {}\n"))
        self.assertNotIn("content-encoding", headers)
        self.assertEqual(headers["access-control-allow-origin"], "*")

    @defer.inlineCallbacks
    def test_hashed_names_are_immutable_others_revalidate(self):
        _, headers, _ = yield self.get(HASHED, accept_encoding="br")
        self.assertEqual(headers["cache-control"], "public, max-age=31536000, immutable")
        _, headers, _ = yield self.get("embed.js", accept_encoding="br")
        self.assertEqual(headers["cache-control"], "public, max-age=300")
        self.assertIn("etag", headers)
        self.assertIn("last-modified", headers)

    @defer.inlineCallbacks
    def test_etag_answers_304_per_coding(self):
        _, br, _ = yield self.get("embed.js", accept_encoding="br")
        _, plain, _ = yield self.get("embed.js")
        self.assertNotEqual(br["etag"], plain["etag"])
        code, headers, body = yield self.get("embed.js", accept_encoding="br", if_none_match=br["etag"])
        self.assertEqual((code, body), (304, b""))
        # The brotli copy's tag does not validate the uncompressed file.
        code, _, body = yield self.get("embed.js", if_none_match=br["etag"])
        self.assertEqual((code, body), (200, SOURCE))

    @defer.inlineCallbacks
    def test_head_names_the_coding_without_a_body(self):
        code, headers, body = yield self.get(HASHED, method=b"HEAD", accept_encoding="br")
        self.assertEqual((code, body, headers["content-encoding"]), (200, b"", "br"))

    @defer.inlineCallbacks
    def test_a_missing_file_is_a_404(self):
        code, _, _ = yield self.get("nothing-ABCDEFGH.js", accept_encoding="br")
        self.assertEqual(code, 404)
