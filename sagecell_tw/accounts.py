# -*- test-case-name: tests.test_security -*-
"""
The Unix account kernels run as, resolved by name: the daemon asks for its
group (kernel dirs are shared with it), the spawner for the account to drop to.
"""

from __future__ import annotations

import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class Account:
    """A resolved Unix account to run as."""

    name: str
    uid: int
    gid: int
    home: str


def lookup_account(name: str) -> Account:
    """Resolve a user name, or explain how to create it."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise LookupError(
            f"the worker account {name!r} does not exist; create it with "
            f"'systemd-sysusers /absolute/path/to/etc/sagecell-sysusers.conf' (run ./setup.sh as root, which does it) or "
            f"'useradd --system --no-create-home --shell /usr/sbin/nologin {name}'"
        ) from None
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)
