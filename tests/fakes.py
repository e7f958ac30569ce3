"""
Fakes shared by the task.Clock tests: what a kernel's zmq sockets would deliver.

The daemon's kernel-side code is driven here without processes or sockets:
a test plays the kernel by calling the handlers the daemon registered.
"""

from __future__ import annotations

from sagecell_tw import messages
from sagecell_tw.messages import Message


def wire(msg: Message) -> list[bytes]:
    """``msg`` as a kernel's zmq multipart message (an identity, then the delimiter)."""
    return [b"", messages.DELIM, b"", msg.header, msg.parent, msg.metadata, msg.content, *msg.buffers]


def publish(kernel, msg: Message) -> None:
    """The kernel publishes ``msg`` on iopub, and the daemon's subscription gets it."""
    kernel.sockets["iopub"].handler(wire(msg))


def warm_up_request(kernel) -> Message:
    """The silent execute_request the daemon sent to warm ``kernel`` up (its last on shell)."""
    msg = messages.from_wire("shell", kernel.sockets["shell"].sent[-1])
    assert msg.msg_type == "execute_request", msg.msg_type
    return msg


def iopub_welcome(kernel) -> None:
    """Make the kernel's iopub answer, as a live subscription would, and finish its warm-up."""
    publish(kernel, messages.status("idle", "k"))
    publish(kernel, messages.status("idle", "k", {"msg_id": warm_up_request(kernel).msg_id}))
