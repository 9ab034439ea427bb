"""A small typed client of Chiffon's API, the one every `chiffon` command uses.

    from chiffon.client import Client

    with Client() as chiffon:  # CHIFFON_ORCHESTRATOR_URL and CHIFFON_API_TOKEN, or `chiffon up`'s
        job = chiffon.run(["python", "train.py"], gpus=1, vram_gb=8, timeout_seconds=3600)
        print(job.state, job.exit_code)

A job's files travel as blobs named by their SHA-256: `missing_blobs` says which the store
lacks, `put_blob` sends one (streamed), `get_blob` fetches one (resumed, verified) and
`job_files` says what a job runs in and what it saved (`chiffon run` and `chiffon get` use
them; the manifest format is `chiffon.schemas.files`).

Errors are `ChiffonError`: `status` is the HTTP status (None when the orchestrator could
not be reached) and `detail` what it said. Its words go to the `chiffon.client` logger:
a submission no agent could ever hold is a warning, a change of why a job waits is info.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import httpx

from chiffon.backoff import Backoff
from chiffon.schemas.dispatch import is_terminal
from chiffon.schemas.files import HASH_CHUNK, is_sha256, sha256_bytes
from chiffon.schemas.jobs import (
    JobAccepted,
    JobDetail,
    JobFiles,
    JobLog,
    JobRequirements,
    JobSubmit,
    JobView,
    Policy,
)

DEFAULT_URL = "http://127.0.0.1:8700"
LOG_WAIT_SECONDS = 20.0  # one long-poll while following a log
# As much as the API gives at once: a reader of fast output keeps up with fewer requests
# (the orchestrator keeps only a tail of each log).
LOG_READ_BYTES = 1024 * 1024
# A line not yet ended (a prompt, dots) is held this long for its end, then shown.
PENDING_WAIT_SECONDS = 0.5
# After a skip, output is resumed at the next line's start, looked for this far: a reader
# never sees half a line glued to another (output without newlines is resumed as it is).
_LINE_SEARCH_BYTES = 64 * 1024
# Hashes one `POST /blobs/missing` names: the API takes up to 100,000, but a request's
# JSON body is held to 64 KiB by default (api/body_limit.py): 900 are 60 kB.
BLOBS_PER_ASK = 900
TRANSFER_TRIES = 5  # a blob's upload, or its download resumed where it stopped
TRANSFER_BACKOFF = Backoff(initial_seconds=0.5, max_seconds=8.0)
# Sending a chunk may wait on a busy store this long (the default read timeout stays).
TRANSFER_WRITE_SECONDS = 120.0

log = logging.getLogger("chiffon.client")


class ChiffonError(Exception):
    """The orchestrator refused (`status`, its `detail`), or could not be reached."""

    def __init__(
        self, detail: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(detail if status is None else f"{detail} (HTTP {status})")
        self.detail = detail
        self.status = status
        self.retry_after = retry_after  # seconds, as a 429 or 503 says (`Retry-After`)


class LookupFailed(ChiffonError):
    """No agent or job matches what was asked for, or several do."""


class Interrupted(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM, SIGHUP) reached a program while it waited on a job. A
    KeyboardInterrupt: `except KeyboardInterrupt` catches it, `except Exception` not."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """SIGINT, SIGTERM and SIGHUP while a program waits on a job (`interruptible`).

    A signal raises `Interrupted`, then holds: the ones after it wait (`pending`) until
    the program `rearm`s, so what a signal starts (cancelling the job) is never cut short
    by the next (`timeout -s INT` signals a program and then its process group: two at
    once). `shield()` holds them over a block (a submission in flight) and raises the one
    that came meanwhile right after it, so a job is never created without its id known."""

    def __init__(self) -> None:
        self.held = False
        self.pending = 0

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.held:
            # SIGTERM or SIGHUP (the terminal is gone) outranks a Ctrl-C.
            if not self.pending or self.pending == signal.SIGINT:
                self.pending = signum
            return
        self.held = True
        raise Interrupted(signum)

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        self.held = True
        try:
            yield
        finally:
            signum = self.rearm()
        if signum:
            self.held = True
            raise Interrupted(signum)

    def rearm(self) -> int:
        """Let the next signal raise again; the one that came while held (0: none)."""
        signum, self.pending, self.held = self.pending, 0, False
        return signum


@contextlib.contextmanager
def interruptible() -> Iterator[Signals]:
    """While inside, SIGINT, SIGTERM and SIGHUP raise `Interrupted` (as `srun` treats
    them: the job is to be cancelled), as `Signals` says; the handlers are put back after.
    A signal the program ignores stays ignored (nohup ignores SIGHUP: the job is to outlive
    the terminal); outside the main thread, signals cannot be caught: nothing changes."""
    signals = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    names = ("SIGINT", "SIGTERM", "SIGHUP")  # SIGHUP does not exist on Windows
    caught = [s for n in names if (s := getattr(signal, n, None)) is not None]
    caught = [s for s in caught if signal.getsignal(s) is not signal.SIG_IGN]
    before = {s: signal.signal(s, signals.on_signal) for s in caught}
    try:
        yield signals
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def default_token(data_dir: Path | None = None) -> str | None:
    """CHIFFON_API_TOKEN, else CHIFFON_READ_TOKEN (reads only), else the token `chiffon up`
    keeps in its data directory."""
    for variable in ("CHIFFON_API_TOKEN", "CHIFFON_READ_TOKEN"):
        if token := os.environ.get(variable):
            return token
    where = data_dir or Path(os.environ.get("CHIFFON_DATA_DIR") or Path.home() / ".chiffon")
    try:
        return (where.expanduser() / "api_token").read_text().strip() or None
    except OSError:
        return None


class LogCursor:
    """Where a reader of a job's output stands: the attempt, the byte offset read up to,
    and the end of a line read but not yet handed out (`pending`). A reader interrupted
    and resumed goes on from here, not from the start."""

    def __init__(self, attempt: int | None = None, offset: int = 0) -> None:
        self.attempt = attempt
        self.offset = offset
        self.pending = ""  # the last line read, not yet ended: it ends with the next piece
        self.resync = False  # bytes were skipped: drop the rest of the line they cut
        self.dropped = 0  # bytes dropped so far looking for that line's end

    def read(self, piece: JobLog, *, follow: bool) -> tuple[list[JobLog], bool]:
        """What to hand out of `piece` (whole lines while more may come), and whether a
        reader that does not `follow` is done."""
        empty = piece.next_offset == piece.offset
        if empty and self.pending and not piece.done:  # the line did not end: show it
            return list(_some(self.flush(piece))), False
        shown = list(_some(self.take(piece)))
        if not follow and (empty or piece.done):
            return shown + list(_some(self.flush(piece))), True
        return shown, False

    def take(self, piece: JobLog) -> JobLog | None:
        """What of `piece` (read from `self.offset`) to hand out: whole lines only, so
        that a skip never glues half a line to another; None when nothing."""
        skipped = max(0, piece.offset - self.offset)  # dropped before it could be read
        if skipped and self.pending:  # the line it cut is left out, counted
            skipped += len(self.pending.encode())
            self.pending = ""
        self.attempt, self.offset = piece.attempt, piece.next_offset
        self.resync = self.resync or skipped > 0
        text = self.pending + piece.data
        cut = self._drop_cut_line(text)
        text = text[len(cut) :]
        self.pending = "" if piece.done else _unended(text)
        text = text[: len(text) - len(self.pending)]
        dropped = len(cut.encode()) + skipped
        if not text and not dropped:
            return None
        # Byte offsets from the server's, less the pending line (which holds no U+FFFD, so
        # its length in bytes is exact): a reader resumed from `next_offset` loses nothing.
        end = piece.next_offset - len(self.pending.encode())
        return piece.model_copy(
            update={
                "data": text,
                "offset": max(0, end - len(text.encode())),
                "next_offset": end,
                "skipped_bytes": dropped,
            }
        )

    def flush(self, piece: JobLog) -> JobLog | None:
        """The pending line, handed out as it is (the reader stops here)."""
        if not self.pending:
            return None
        text, self.pending = self.pending, ""
        start = self.offset - len(text.encode())
        return piece.model_copy(
            update={"data": text, "offset": start, "next_offset": self.offset, "skipped_bytes": 0}
        )

    def _drop_cut_line(self, text: str) -> str:
        """After a skip: the rest of the line it cut, looked for over at most
        `_LINE_SEARCH_BYTES` (output without newlines is resumed as it is)."""
        if not self.resync or not text:
            return ""
        newline = text.find("\n")
        cut = text if newline < 0 else text[: newline + 1]
        self.dropped += len(cut.encode())
        if self.dropped > _LINE_SEARCH_BYTES:
            self.resync, self.dropped = False, 0
            return ""
        if newline >= 0:
            self.resync, self.dropped = False, 0
        return cut


def _unended(text: str) -> str:
    """The end of `text` after its last newline or carriage return (a progress bar
    redraws its line with one): held until the line ends or `PENDING_WAIT_SECONDS` pass.
    Not held when long, or when it holds U+FFFD (an undecodable byte: its length in
    bytes is not known here)."""
    last = max(text.rfind("\n"), text.rfind("\r"))
    rest = text[last + 1 :]
    return "" if len(rest) > _LINE_SEARCH_BYTES // 4 or "\ufffd" in rest else rest


class Client:
    def __init__(
        self, url: str | None = None, *, token: str | None = None, timeout_seconds: float = 10.0
    ) -> None:
        self.url = (url or os.environ.get("CHIFFON_ORCHESTRATOR_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else default_token()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout_seconds
        self._http = httpx.Client(
            base_url=f"{self.url}/api/v1", headers=headers, timeout=timeout_seconds
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit(
        self,
        command: Sequence[str],
        *,
        gpus: int | None = None,
        vram_gb: float = 0.0,
        cpu_cores: float = 0.0,
        memory_gb: float = 0.0,
        pool: str | None = None,
        labels: Mapping[str, str] | None = None,
        gpu_vendor: str | None = None,
        require_sandbox: bool = False,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        timeout_seconds: float | None = None,
        retries: int = 0,
        retry_on_exit: bool = False,
        policy: Policy = "best_fit",
        snapshot: str | None = None,
        outputs: Sequence[str] = (),
        checkpoint_every_seconds: float | None = None,
        python_env: bool = False,
    ) -> JobAccepted:
        """Queue `command` (an argv list) to run once where it fits. `vram_gb` is free
        memory on each GPU; giving it without `gpus` asks for one GPU; `require_sandbox`:
        only a desktop whose job sandbox is full (docs/jobs.md). The answer's
        `warning` is set when no registered agent could ever hold the job.

        Sent with a new `Idempotency-Key`, and sent again with the same key (twice at
        most) when no answer came or the orchestrator was unavailable (502, 503, 504):
        a submission whose reply was lost had created its job, and the orchestrator
        answers the retry with that job instead of creating a second.

        Files: `snapshot` is the hash of a manifest already stored with all its blobs
        (`put_blob`; the job runs in a copy of that tree), `outputs` the globs of what
        comes back (`job_files`), `checkpoint_every_seconds` how often a running job's
        checkpoint folder is saved, `python_env` builds the snapshot's Python environment
        (uv.lock or requirements.txt) on the desktop."""
        body = self.submission(
            command,
            gpus=gpus,
            vram_gb=vram_gb,
            cpu_cores=cpu_cores,
            memory_gb=memory_gb,
            pool=pool,
            labels=labels,
            gpu_vendor=gpu_vendor,
            require_sandbox=require_sandbox,
            name=name,
            env=env,
            workdir=workdir,
            timeout_seconds=timeout_seconds,
            retries=retries,
            retry_on_exit=retry_on_exit,
            policy=policy,
            snapshot=snapshot,
            outputs=outputs,
            checkpoint_every_seconds=checkpoint_every_seconds,
            python_env=python_env,
        )
        return JobAccepted.model_validate(self._submit_once(body))

    def submission(
        self,
        command: Sequence[str],
        *,
        gpus: int | None = None,
        vram_gb: float = 0.0,
        cpu_cores: float = 0.0,
        memory_gb: float = 0.0,
        pool: str | None = None,
        labels: Mapping[str, str] | None = None,
        gpu_vendor: str | None = None,
        require_sandbox: bool = False,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        timeout_seconds: float | None = None,
        retries: int = 0,
        retry_on_exit: bool = False,
        policy: Policy = "best_fit",
        snapshot: str | None = None,
        outputs: Sequence[str] = (),
        checkpoint_every_seconds: float | None = None,
        python_env: bool = False,
    ) -> dict[str, Any]:
        """What `submit` sends, checked here as the server checks it (pydantic's
        `ValidationError` names the first field refused), without sending it."""
        wanted: dict[str, Any] = {"vram_gb": vram_gb, "cpu_cores": cpu_cores,
                                  "memory_gb": memory_gb, "labels": dict(labels or {}),
                                  "pool": pool, "gpu_vendor": gpu_vendor,
                                  "require_sandbox": require_sandbox}  # fmt: skip
        if gpus is not None:
            wanted["gpus"] = gpus
        spec = {
            "command": list(command), "name": name, "env": dict(env or {}), "workdir": workdir,
            "timeout_seconds": timeout_seconds, "retries": retries,
            "retry_on_exit": retry_on_exit, "policy": policy,
            "requirements": JobRequirements.model_validate(wanted).model_dump(mode="json"),
        }  # fmt: skip
        # Only what is asked: a submission without files reads as it always did.
        files = {"snapshot": snapshot, "outputs": list(outputs),
                 "checkpoint_every_seconds": checkpoint_every_seconds,
                 "python_env": python_env}  # fmt: skip
        spec.update({k: v for k, v in files.items() if v})
        body = JobSubmit.model_validate(spec).model_dump(mode="json", exclude_none=True)
        return body

    def _submit_once(self, body: dict[str, Any]) -> Any:
        """POST the job with a key of this call's own, again with the same key while no
        answer comes (a restarted orchestrator, a failover: seconds)."""
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        retries_left, pause_seconds = 2, 0.5
        while True:
            try:
                return self._send("POST", "/jobs", json=body, headers=headers)
            except ChiffonError as exc:
                if not retries_left or exc.status not in (None, 502, 503, 504):
                    raise
                log.info("submission not answered (%s); sending it again with its key", exc)
            time.sleep(pause_seconds)
            retries_left, pause_seconds = retries_left - 1, pause_seconds * 2

    def run(
        self,
        command: Sequence[str],
        *,
        wait_seconds: float | None = None,
        on_reason: Callable[[JobView], None] | None = None,
        **spec: Any,
    ) -> JobDetail:
        """Submit `command` (the arguments of `submit`), wait for it to end and return
        it, as `srun` does: interrupted (Ctrl-C, SIGTERM, SIGHUP) or out of
        `wait_seconds`, it cancels the job and raises (`Interrupted`, `TimeoutError`)."""
        with interruptible() as signals:
            accepted: JobAccepted | None = None
            try:
                with signals.shield():  # a signal meanwhile waits for the job's id
                    accepted = self.submit(command, **spec)
                if accepted.warning:
                    log.warning("job %s: %s", accepted.job.job_id, accepted.warning)
                return self.wait(
                    accepted.job.job_id, timeout_seconds=wait_seconds, on_reason=on_reason
                )
            except (KeyboardInterrupt, TimeoutError) as exc:
                if accepted is not None:
                    what = "ran out of time" if isinstance(exc, TimeoutError) else f"got {exc!r}"
                    log.warning("%s: cancelling job %s", what, accepted.job.job_id)
                    with contextlib.suppress(ChiffonError):  # more signals are held
                        self.cancel(accepted.job.job_id)
                raise

    def get(self, job_id: uuid.UUID | str) -> JobDetail:
        """The job with its attempts and events."""
        return JobDetail.model_validate(self._send("GET", f"/jobs/{job_id}"))

    def jobs(
        self,
        *,
        state: str | None = None,
        agent_id: uuid.UUID | str | None = None,
        limit: int = 100,
    ) -> list[JobView]:
        """Jobs, newest first."""
        params = {k: str(v) for k, v in (("state", state), ("agent_id", agent_id)) if v}
        found = self._send("GET", "/jobs", params={**params, "limit": limit})
        return [JobView.model_validate(j) for j in found]

    def cancel(self, job_id: uuid.UUID | str) -> JobView:
        """Cancel (idempotent): at once when queued, after the grace period when running."""
        return JobView.model_validate(self._send("POST", f"/jobs/{job_id}/cancel"))

    def wait(
        self,
        job_id: uuid.UUID | str,
        *,
        timeout_seconds: float | None = None,
        on_reason: Callable[[JobView], None] | None = None,
    ) -> JobDetail:
        """The job once it has ended (succeeded, failed, cancelled, timed_out or lost);
        `TimeoutError` (saying why it still waits) after `timeout_seconds`. Each time
        the reason it waits in the queue changes, `on_reason(job)` is called (default:
        logged at INFO)."""
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        pause, said = 0.1, ""
        while True:
            job = self.get(job_id)
            if is_terminal(job.state):
                return job
            said = _tell_reason(job, said, on_reason)
            if deadline is not None and time.monotonic() >= deadline:
                why = f": {job.reason}" if job.reason and job.reason != job.state else ""
                raise TimeoutError(f"job {job_id} is still {job.state}{why}")
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    def log(
        self,
        job_id: uuid.UUID | str,
        *,
        attempt: int | None = None,
        offset: int = 0,
        wait_seconds: float = 0.0,
    ) -> JobLog:
        """One piece of an attempt's output from `offset` (the current attempt unless
        given), waiting up to `wait_seconds` for some when there is none yet. `offset`
        of the answer past the one asked: the bytes between are no longer kept."""
        params: dict[str, Any] = {"offset": offset, "wait": wait_seconds, "limit": LOG_READ_BYTES}
        if attempt:  # attempt 0 (never placed) reads as the current one
            params["attempt"] = attempt
        try:
            answer = self._send(
                "GET", f"/jobs/{job_id}/logs", params=params, timeout=wait_seconds + self._timeout
            )
        except ChiffonError as exc:
            if exc.status != 429 or not wait_seconds:
                raise
            # This token holds as many long-polls as the orchestrator allows: read without
            # waiting (not bounded), and when nothing is new, pause as it asks.
            answer = self._send("GET", f"/jobs/{job_id}/logs", params={**params, "wait": 0})
            piece = JobLog.model_validate(answer)
            if not piece.data and not piece.done:
                time.sleep(min(wait_seconds, exc.retry_after or 1.0))
            return piece
        return JobLog.model_validate(answer)

    def logs(
        self, job_id: uuid.UUID | str, *, follow: bool = False, cursor: LogCursor | None = None
    ) -> Iterator[JobLog]:
        """The job's output, piece by piece, in order, in whole lines while more may come;
        with `follow`, as it is written, through every attempt, until the job ends. A
        piece's `skipped_bytes` counts output before it that the orchestrator no longer
        kept (it keeps a tail): those bytes and the rest of the line they cut are left
        out, never silently. Give a `cursor` to go on later from where a reader stopped."""
        at = cursor or LogCursor()
        while True:
            wait = (PENDING_WAIT_SECONDS if at.pending else LOG_WAIT_SECONDS) if follow else 0.0
            piece = self.log(job_id, attempt=at.attempt, offset=at.offset, wait_seconds=wait)
            shown, finished = at.read(piece, follow=follow)
            yield from shown
            if finished or (piece.done and self._attempt_over(job_id, piece, at)):
                return

    def _attempt_over(self, job_id: uuid.UUID | str, piece: JobLog, at: LogCursor) -> bool:
        """The attempt `piece` was read from is over: whether the job is too (else `at`
        moves to the next attempt, or waits for the job to be placed again)."""
        job = self.get(job_id)
        if is_terminal(job.state) and job.attempt <= piece.attempt:
            return True
        if job.attempt > piece.attempt:
            at.attempt, at.offset = piece.attempt + 1, 0
        else:
            time.sleep(0.5)  # queued again, not yet placed
        return False

    def missing_blobs(self, hashes: Iterable[str]) -> set[str]:
        """Which of `hashes` (SHA-256, hex) the orchestrator's store lacks."""
        wanted = sorted(set(hashes))
        missing: set[str] = set()
        for start in range(0, len(wanted), BLOBS_PER_ASK):
            ask = wanted[start : start + BLOBS_PER_ASK]
            answer = self._send("POST", "/blobs/missing", json={"sha256": ask})
            missing.update(h for h in answer.get("missing", ()) if h in set(ask))
        return missing

    def put_blob(
        self,
        sha256: str,
        source: Path | bytes,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Store a blob: a file, streamed in chunks (never whole in memory), or bytes. The
        orchestrator refuses it (400, nothing stored) when its hash is not `sha256`: a file
        that changed while it was sent. Sent again from the start after a dropped
        connection; `on_progress(n)` counts bytes sent (negative: a restart takes them
        back). Its size."""
        _check_sha(sha256)
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        tries = 0
        while True:
            tries += 1
            counted = [0]
            try:
                self._put_once(sha256, source, size, _counting(on_progress, counted))
                return size
            except httpx.TransportError as exc:
                if on_progress and counted[0]:
                    on_progress(-counted[0])
                if tries >= TRANSFER_TRIES:
                    why = f"sending blob {sha256[:12]} to {self.url} failed"
                    raise ChiffonError(f"{why} ({type(exc).__name__})") from None
                time.sleep(TRANSFER_BACKOFF.delay(tries))

    def _put_once(
        self, sha256: str, source: Path | bytes, size: int, progress: Callable[[int], None]
    ) -> None:
        headers = {"content-type": "application/octet-stream", "content-length": str(size)}
        timeout = httpx.Timeout(self._timeout, write=TRANSFER_WRITE_SECONDS)
        if isinstance(source, bytes):
            resp = self._http.put(f"/blobs/{sha256}", content=source, headers=headers,
                                  timeout=timeout)  # fmt: skip
            progress(size)
        else:
            with source.open("rb") as f:
                chunks = _chunks(f, size, progress)
                resp = self._http.put(f"/blobs/{sha256}", content=chunks, headers=headers,
                                      timeout=timeout)  # fmt: skip
        _answer(resp, self.url)

    def get_blob(
        self,
        sha256: str,
        dest: Path,
        on_progress: Callable[[int], None] | None = None,
        *,
        size: int | None = None,
    ) -> int:
        """Download a blob to `dest`: streamed to a temporary file beside it, resumed
        (`Range: bytes=N-`) after a dropped connection, its SHA-256 checked, then renamed
        into place; nothing is left at `dest` when it fails. `size`, when known, bounds
        what is read. Its size."""
        _check_sha(sha256)
        fd, temp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                part = _Partial(f, size, on_progress)
                self._download(sha256, part)
            if (got := part.digest.hexdigest()) != sha256:
                raise ChiffonError(f"blob {sha256[:12]} arrived with the hash {got[:12]}: "
                                   "refused, nothing written")  # fmt: skip
            os.replace(temp, dest)
            return part.offset
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    def _download(self, sha256: str, part: _Partial) -> None:
        tries = 0
        while True:
            try:
                headers = {"range": f"bytes={part.offset}-"} if part.offset else {}
                with self._http.stream("GET", f"/blobs/{sha256}", headers=headers) as resp:
                    if not resp.is_success:
                        resp.read()
                        _answer(resp, self.url)
                    if resp.status_code != 206:  # the whole blob: from its start
                        part.restart()
                    # As it arrives: bytes buffered into a bigger chunk would be lost with
                    # the connection, and fetched again.
                    for chunk in resp.iter_bytes():
                        part.write(chunk, sha256)
                return
            except httpx.TransportError as exc:
                tries += 1
                if tries >= TRANSFER_TRIES:
                    why = f"fetching blob {sha256[:12]} from {self.url} failed"
                    raise ChiffonError(f"{why} ({type(exc).__name__}, {tries} tries)") from None
                log.info("fetching blob %s: %s; resuming at byte %d",
                         sha256[:12], type(exc).__name__, part.offset)  # fmt: skip
                time.sleep(TRANSFER_BACKOFF.delay(tries))

    def read_blob(self, sha256: str, max_bytes: int) -> bytes:
        """A small blob (a manifest) in memory, its hash checked; at most `max_bytes`."""
        _check_sha(sha256)
        data = bytearray()
        with self._http.stream("GET", f"/blobs/{sha256}") as resp:
            if not resp.is_success:
                resp.read()
                _answer(resp, self.url)
            for chunk in resp.iter_bytes(HASH_CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise ChiffonError(f"blob {sha256[:12]} is over {max_bytes} bytes")
        if sha256_bytes(bytes(data)) != sha256:
            raise ChiffonError(f"blob {sha256[:12]} arrived with another hash: refused")
        return bytes(data)

    def job_files(self, job_id: uuid.UUID | str) -> JobFiles:
        """The job's snapshot (its manifest's hash), its saved outputs and its latest
        checkpoint, each a `FileSet` (the manifest to fetch, with its entries) or None."""
        return JobFiles.model_validate(self._send("GET", f"/jobs/{job_id}/files"))

    def get_json(self, path: str, **params: Any) -> Any:
        """GET any endpoint of the API (`/agents`, `/fleet/summary`...) as parsed JSON;
        parameters that are None are left out."""
        query = {k: v for k, v in params.items() if v is not None}
        return self._send("GET", path, params=query)

    def delete(self, path: str) -> None:
        self._send("DELETE", path)

    def post_json(self, path: str, body: Any = None) -> Any:
        """POST to any endpoint of the API (admin actions); its answer as parsed JSON."""
        return self._send("POST", path, json=body)

    def resolve_agent(self, ref: str) -> str:
        """An agent id from a UUID, a unique id prefix (as `chiffon agents` shows) or a
        name; `LookupFailed` when none or several match."""
        try:
            return str(uuid.UUID(ref))
        except ValueError:
            pass
        agents = self.get_json("/agents")
        hits = [a for a in agents if a["agent_id"].startswith(ref.lower()) or a["name"] == ref]
        if len(hits) == 1:
            return str(hits[0]["agent_id"])
        if not hits:
            raise LookupFailed(f"no agent has the id, id prefix or name {ref!r}")
        raise LookupFailed(f"{ref!r} matches {len(hits)} agents; give more of the id")

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ChiffonError(
                f"cannot reach the orchestrator at {self.url} ({type(exc).__name__}); "
                "is it running?"
            ) from None
        return _answer(resp, self.url)


def _answer(resp: httpx.Response, url: str) -> Any:
    """A success's JSON (None when empty), else `ChiffonError` with what it said."""
    if resp.is_success:
        return resp.json() if resp.content else None
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    raise ChiffonError(str(detail or resp.reason_phrase), resp.status_code,
                       _seconds(resp.headers.get("retry-after")))  # fmt: skip


def _check_sha(sha256: str) -> None:
    if not is_sha256(sha256):
        raise ChiffonError(f"{sha256[:80]!r} is not a SHA-256 (64 lowercase hex digits)")


def _counting(
    on_progress: Callable[[int], None] | None, counted: list[int]
) -> Callable[[int], None]:
    def progress(n: int) -> None:
        counted[0] += n
        if on_progress is not None:
            on_progress(n)

    return progress


def _chunks(f: IO[bytes], size: int, progress: Callable[[int], None]) -> Iterator[bytes]:
    """At most `size` bytes of `f` in chunks: a file that grew meanwhile is sent as far as
    its announced length (its hash then differs, and the store refuses it)."""
    left = size
    while left > 0 and (chunk := f.read(min(HASH_CHUNK, left))):
        left -= len(chunk)
        yield chunk
        progress(len(chunk))


class _Partial:
    """A download written so far: where it stands, its running hash, its bound."""

    def __init__(
        self, f: IO[bytes], size: int | None, on_progress: Callable[[int], None] | None
    ) -> None:
        self.f, self.size, self.on_progress = f, size, on_progress
        self.offset = 0
        self.digest = hashlib.sha256()

    def restart(self) -> None:
        if self.offset and self.on_progress:
            self.on_progress(-self.offset)
        self.f.seek(0)
        self.f.truncate()
        self.offset, self.digest = 0, hashlib.sha256()

    def write(self, chunk: bytes, sha256: str) -> None:
        if self.size is not None and self.offset + len(chunk) > self.size:
            raise ChiffonError(f"blob {sha256[:12]} is longer than its {self.size} bytes")
        self.f.write(chunk)
        self.digest.update(chunk)
        self.offset += len(chunk)
        if self.on_progress:
            self.on_progress(len(chunk))


def _seconds(header: str | None) -> float | None:
    """`Retry-After` as seconds (the HTTP-date form is not used by Chiffon)."""
    try:
        return None if header is None else max(0.0, float(header))
    except ValueError:
        return None


def _some(piece: JobLog | None) -> Iterator[JobLog]:
    if piece is not None:
        yield piece


def _tell_reason(job: JobView, said: str, on_reason: Callable[[JobView], None] | None) -> str:
    """Say why a queued job waits when that changed since `said`; what is said now."""
    waits = job.reason if job.state == "queued" else ""
    if not waits or waits == said:
        return said
    if on_reason is not None:
        on_reason(job)
    else:
        log.info("job %s %s: %s", job.job_id, job.state, job.reason or "")
    return waits
