"""Calls that may hang (GPU drivers) run in daemon threads that never hold up the agent.

A daemon thread stuck in a driver does not block interpreter exit, and the callers below
keep at most one such thread per backend: a backend still blocked is skipped, not called
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

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
