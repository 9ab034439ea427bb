"""Calls that may hang (GPU drivers) run in daemon threads that never hold up the agent,
and child processes (nvidia-smi) run with a deadline and a bound on their output.

A daemon thread stuck in a driver does not block interpreter exit, and the callers below
keep at most one such thread per backend: a backend still blocked is skipped, not called
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Generic, TypeVar

T = TypeVar("T")


class BackgroundCall(Generic[T]):
    """`fn()` running in its own daemon thread; wait for it with a deadline."""

    def __init__(self, fn: Callable[[], T], *, name: str) -> None:
        self._fn = fn
        self._done = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._fn()
        except BaseException as exc:  # handed to the waiter, who decides
            self._error = exc
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_seconds: float) -> bool:
        return self._done.wait(max(0.0, timeout_seconds))

    def result(self) -> T:
        """The return value (or the exception raised) of a finished call."""
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


async def in_daemon_thread(fn: Callable[[], T], *, name: str) -> T:
    """Await `fn()` run in a daemon thread, unlike `asyncio.to_thread`, whose pool threads
    `asyncio.run` waits for at exit: a stop must not wait on a hung driver."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled by a stop meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:
            error = exc
        # RuntimeError: the loop closed while we ran, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


class OutputTooLarge(RuntimeError):
    """A child wrote more than it may; it was killed with its process group."""


@dataclass(frozen=True, slots=True)
class Finished:
    returncode: int
    stdout: bytes
    stderr: bytes


class _Drain:
    """Reads one pipe in a daemon thread, keeping at most `limit` bytes."""

    def __init__(self, pipe: IO[bytes], limit: int) -> None:
        self.data = bytearray()
        self.overflow = False
        self.done = threading.Event()
        self._pipe, self._limit = pipe, limit
        threading.Thread(target=self._read, name="chiffon-pipe", daemon=True).start()

    def _read(self) -> None:
        try:
            while chunk := os.read(self._pipe.fileno(), 65_536):
                if len(self.data) + len(chunk) > self._limit:
                    self.overflow = True  # stop reading: the caller kills the writer
                    return
                self.data += chunk
        except OSError:  # the pipe broke: what was read stands
            pass
        finally:
            self._pipe.close()  # here, by the only thread reading it
            self.done.set()


def run_bounded(argv: Sequence[str], *, timeout_seconds: float, max_output_bytes: int) -> Finished:
    """Run `argv` with a deadline and a bound on what it may write to each pipe.

    The child starts a process group of its own (POSIX), and that whole group is killed
    when the run ends, whatever way it ends: a wrapper script killed at the timeout must
    not leave its children running, and a child that streams output forever is stopped at
    `max_output_bytes` instead of growing the agent. Raises `subprocess.TimeoutExpired`,
    `OutputTooLarge` or `OSError`.
    """
    posix = os.name == "posix"
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=posix,
    )
    assert proc.stdout is not None and proc.stderr is not None
    drains = (_Drain(proc.stdout, max_output_bytes), _Drain(proc.stderr, max_output_bytes))
    deadline = time.monotonic() + timeout_seconds
    try:
        for drain in drains:
            finished = drain.done.wait(max(0.0, deadline - time.monotonic()))
            if drain.overflow:
                raise OutputTooLarge(f"wrote more than {max_output_bytes} bytes")
            if not finished:
                raise subprocess.TimeoutExpired(list(argv), timeout_seconds)
        returncode = proc.wait(max(0.0, deadline - time.monotonic()))
        return Finished(returncode, bytes(drains[0].data), bytes(drains[1].data))
    finally:
        _kill_group(proc, posix)


def _kill_group(proc: subprocess.Popen[bytes], posix: bool) -> None:
    """SIGKILL the child's whole process group (its leftovers too), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if posix:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(1)
