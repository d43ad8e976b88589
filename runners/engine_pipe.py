"""The pipe between a supervisor (in a worker) and one child process it forked: the engine processes of
`runners/supervisor.py` and the throwaway key verifiers of `runners/verification.py`.

Messages, in order, on an engine's pipe:
- child -> supervisor, once: `LOADED`, when its models are loaded;
- supervisor -> child: a `Row` to evaluate, a `Forget` (drop a deleted key from the warm-key cache), or
  None to stop;
- child -> supervisor, per row: `(True, FHE seconds)` then the result's bytes as a raw message (pickling
  megabytes cost a copy each way), `(True, None)` for a row dropped at its deadline, or `(False, error)`;
  per `Forget`: `(True, None)`.
A verifier sends one `(ok, value)` and exits. A child that dies reads as EOF on its pipe.

Children fork from a forkserver that has imported concrete, so a restart or a verification does not pay
the 3 s import again.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import select
import socket
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

STOP_GRACE = 1.0  # seconds a stopped process has to exit on its own before it is killed
PIPE_BUFFER_BYTES = 4 << 20  # socket buffers of the pipe to each child (`_widen`)
LOADED = "loaded"  # an engine process's first message

Row = tuple[str, str, str | None, bytes, float]  # model, key scope, key id, ciphertext, deadline
RowResult = tuple[bytes, float] | None  # result and FHE seconds; None: dropped at its deadline


class Forget(NamedTuple):
    """Drop this key from the engine's warm-key cache: it was deleted."""

    scope: str
    key_id: str


def _context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [
            "concrete.fhe",
            "concrete.ml.deployment",
            "fhe_bento.runners.engine_process",
            "fhe_bento.runners.forkserver_signals",
        ]
    )  # last: concrete installs handlers
    return context


def _widen(conn: Connection) -> None:
    """Give one end of a pipe to a child (a Unix socket pair) buffers of PIPE_BUFFER_BYTES, so that a
    result of megabytes crosses in a few reads instead of one wake-up per default buffer (about 200 KB):
    on a hybrid model's 2 MB layer result that was a third of the worker's CPU per call. The kernel caps
    the sizes at net.core.wmem_max / rmem_max; memory is used only while bytes are in flight."""
    sock = socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)  # a duplicate of the fd
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIPE_BUFFER_BYTES)
    finally:
        sock.close()


def send_row_answer(conn: Connection, answer: tuple[bool, Any]) -> None:
    """In an engine process: a row's `(ok, value)`, its result's bytes as a raw message after its seconds
    (a `Forget`'s answer, `(True, None)`, goes as it is)."""
    ok, value = answer
    if ok and value is not None:
        result, seconds = value
        conn.send((True, seconds))
        conn.send_bytes(result)
    else:
        conn.send(answer)


class Child:
    """A child process forked by the forkserver, and the supervisor's end of a pipe to it. Used by one
    thread at a time: it alone waits for the process and reaps it."""

    def __init__(self, name: str, main: Callable[..., None], *args: Any) -> None:
        context = _context()
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=main, args=(child_end, *args), name=name)
        self.process.start()
        for end in (self.conn, child_end):
            _widen(end)
        child_end.close()  # the child's is the only one left: its death reads as EOF here
        # One poll set for the process's life: its pipe (a message, or EOF once it is gone) and its sentinel.
        # multiprocessing's `wait` builds a selector on every call, and `is_alive` another: on a cheap
        # circuit's row, that was a measurable share of the supervisor's CPU.
        self._events = select.poll()
        for fd in (self.conn.fileno(), self.process.sentinel):
            self._events.register(fd, select.POLLIN)

    def answered(self, timeout: float | None = None) -> bool:
        """Whether a message or the child's death came within `timeout`."""
        return bool(self._events.poll(None if timeout is None else 1000 * timeout))

    def idle_and_alive(self) -> bool:
        """For a child that owes no answer: whether it is still alive. Such a child writes nothing, so
        anything to read on its pipe or sentinel means it has died."""
        return not self.answered(0)

    def receive(self) -> Any:
        """The child's next message, once `answered`; EOFError if it died first."""
        try:
            if self.conn.poll():  # readable: a message, or EOF once the child is gone
                return self.conn.recv()
        except OSError:
            pass
        raise EOFError

    def receive_row(self) -> tuple[bool, Any]:
        """An engine's answer to a row, once `answered`: (True, (result, FHE seconds)), (True, None) for a
        row dropped at its deadline (or a `Forget` done), or (False, the error); EOFError (or OSError) if it
        died first."""
        ok, value = self.receive()
        if ok and value is not None:
            return True, (self.conn.recv_bytes(), value)
        return ok, value

    def stop(self) -> None:
        """End the child on purpose: an idle engine exits when told; any other is killed after STOP_GRACE."""
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(STOP_GRACE)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
        self.conn.close()
