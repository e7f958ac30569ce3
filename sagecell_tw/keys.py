# -*- test-case-name: tests.test_workers -*-
"""
CurveZMQ keys for the link between the daemon and worker hosts.

``sagecell-keys generate DIR NAME`` writes ``DIR/NAME.key`` (the public key,
to copy to the other side) and ``DIR/NAME.key_secret`` (mode 0600, never
leaves the host). The daemon has one pair and an allow-list directory of the
workers' public keys; each worker has one pair and the daemon's public key.
"""

from __future__ import annotations

import argparse
import os
import sys


def generate(directory: str, name: str) -> tuple[str, str]:
    """Make NAME.key and NAME.key_secret in ``directory``; the secret is 0600 from the start."""
    import zmq.auth

    os.makedirs(directory, mode=0o700, exist_ok=True)
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file, which must not be readable by others."""
    import zmq.auth

    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise ValueError(f"{path} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


def load_public(path: str) -> bytes:
    import zmq.auth

    return zmq.auth.load_certificate(path)[0]


def load_allowed(directory: str) -> set[bytes]:
    """Every public key in ``directory`` (files ending in ``.key``)."""
    import zmq.auth

    try:
        return set(zmq.auth.load_certificates(directory).keys())
    except OSError:
        return set()


def zap_answer(frames: list[bytes], allowed: set[bytes]) -> tuple[list[bytes] | None, bool]:
    """
    The reply to a ZAP request (RFC 27) read on a ROUTER bound to
    ``inproc://zeromq.zap.01``: admit a CURVE client whose public key (Z85) is
    in ``allowed``. (None, False) for something that is not a ZAP request.
    """
    from zmq.utils import z85

    if len(frames) < 9 or frames[1] != b"":
        return None, False
    routing, _, version, request_id, _domain, _address, _identity, mechanism = frames[:8]
    ok = version == b"1.0" and mechanism == b"CURVE" and len(frames[8]) == 32 and z85.encode(frames[8]) in allowed
    status = [b"200", b"OK", b"worker"] if ok else [b"400", b"key not allowed", b""]
    return [routing, b"", b"1.0", request_id, *status, b""], ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sagecell-keys", description="CurveZMQ keys for sagecell_tw worker hosts")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="make DIR/NAME.key and DIR/NAME.key_secret (0600)")
    g.add_argument("dir")
    g.add_argument("name")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    public, secret = generate(args.dir, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it on this host only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
