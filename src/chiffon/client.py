"""A small typed client of Chiffon's jobs API, the one `chiffon run`, `chiffon jobs` and
`chiffon logs` use.

    from chiffon.client import Client

    with Client() as chiffon:  # CHIFFON_ORCHESTRATOR_URL and CHIFFON_API_TOKEN, or `chiffon up`'s
        job = chiffon.submit(["python", "train.py"], gpus=1, vram_gb=8, cpu_cores=2)
        print(chiffon.wait(job.job_id).state)

Errors are `ChiffonError`: `status` is the HTTP status (None when the orchestrator could
not be reached) and `detail` what it said.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from chiffon.schemas.jobs import (
    TERMINAL,
    JobAccepted,
    JobDetail,
    JobLog,
    JobRequirements,
    JobSubmit,
    JobView,
    Policy,
)

DEFAULT_URL = "http://127.0.0.1:8700"
LOG_WAIT_SECONDS = 20.0  # one long-poll while following a log


class ChiffonError(Exception):
    """The orchestrator refused (`status`, its `detail`), or could not be reached."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail if status is None else f"{detail} (HTTP {status})")
        self.detail = detail
        self.status = status


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
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        timeout_seconds: float | None = None,
        retries: int = 0,
        retry_on_exit: bool = False,
        policy: Policy = "best_fit",
    ) -> JobAccepted:
        """Queue `command` (an argv list) to run once where it fits. `vram_gb` is free
        memory on each GPU; giving it without `gpus` asks for one GPU. The answer's
        `warning` is set when no registered agent could ever hold the job."""
        wanted: dict[str, Any] = {"vram_gb": vram_gb, "cpu_cores": cpu_cores,
                                  "memory_gb": memory_gb, "labels": dict(labels or {}),
                                  "pool": pool, "gpu_vendor": gpu_vendor}  # fmt: skip
        if gpus is not None:
            wanted["gpus"] = gpus
        spec = {
            "command": list(command), "name": name, "env": dict(env or {}), "workdir": workdir,
            "timeout_seconds": timeout_seconds, "retries": retries,
            "retry_on_exit": retry_on_exit, "policy": policy,
            "requirements": JobRequirements.model_validate(wanted).model_dump(mode="json"),
        }  # fmt: skip
        body = JobSubmit.model_validate(spec).model_dump(mode="json", exclude_none=True)
        return JobAccepted.model_validate(self._send("POST", "/jobs", json=body))

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

    def wait(self, job_id: uuid.UUID | str, *, timeout_seconds: float | None = None) -> JobDetail:
        """The job once it has ended (succeeded, failed, cancelled, timed_out or lost);
        `TimeoutError` after `timeout_seconds`."""
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        pause = 0.1
        while True:
            job = self.get(job_id)
            if job.state in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.state}")
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
        given), waiting up to `wait_seconds` for some when there is none yet."""
        params: dict[str, Any] = {"offset": offset, "wait": wait_seconds}
        if attempt:  # attempt 0 (never placed) reads as the current one
            params["attempt"] = attempt
        answer = self._send(
            "GET", f"/jobs/{job_id}/logs", params=params, timeout=wait_seconds + self._timeout
        )
        return JobLog.model_validate(answer)

    def logs(self, job_id: uuid.UUID | str, *, follow: bool = False) -> Iterator[JobLog]:
        """The job's output, piece by piece; with `follow`, as it is written, through
        every attempt, until the job ends."""
        attempt, offset = None, 0
        while True:
            piece = self.log(job_id, attempt=attempt, offset=offset,
                             wait_seconds=LOG_WAIT_SECONDS if follow else 0.0)  # fmt: skip
            if piece.data:
                yield piece
            attempt, offset = piece.attempt, piece.next_offset
            if not follow and (not piece.data or piece.done):
                return
            if piece.done:  # this attempt is over: the job ended, or is placed again
                job = self.get(job_id)
                if job.state in TERMINAL and job.attempt <= piece.attempt:
                    return
                if job.attempt > piece.attempt:
                    attempt, offset = piece.attempt + 1, 0
                else:
                    time.sleep(0.5)  # queued again, not yet placed

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ChiffonError(f"cannot reach {self.url}: {type(exc).__name__}: {exc}") from None
        if resp.is_success:
            return resp.json()
        try:
            detail = resp.json().get("detail")
        except ValueError:
            detail = None
        raise ChiffonError(str(detail or resp.reason_phrase), resp.status_code)
