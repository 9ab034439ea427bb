"""A submission retried with its `Idempotency-Key` returns the first one's job and creates
none: twice in a row, from two orchestrators at once, and from `chiffon.client` whose
reply was lost on the way back. The same key with another submission is refused; a key
is forgotten after a day."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from chiffon.client import Client
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence import jobs as jobs_repo
from tests.auth import API_HEADERS, API_TOKEN
from tests.conftest import api_client, serving

TRAIN = {"command": ["python", "train.py"], "name": "train", "requirements": {"gpus": 1}}
DAY_SECONDS = 24 * 3600


def keyed(key: str) -> dict[str, str]:
    return {**API_HEADERS, "Idempotency-Key": key}


async def job_ids(api: httpx.AsyncClient) -> list[str]:
    return [job["job_id"] for job in (await api.get("/api/v1/jobs")).json()]


async def test_the_same_key_twice_returns_the_first_job_and_creates_none(
    orchestrator: Orchestrator,
) -> None:
    async with api_client(orchestrator, API_HEADERS) as api:
        first = await api.post("/api/v1/jobs", json=TRAIN, headers=keyed("run-7f3a"))
        # The same submission written otherwise (keys reordered, a default spelled out).
        again = {"requirements": {"gpus": 1}, "name": "train", "retries": 0,
                 "command": ["python", "train.py"]}  # fmt: skip
        second = await api.post("/api/v1/jobs", json=again, headers=keyed("run-7f3a"))
        assert first.status_code == second.status_code == 201, second.text
        job_id = first.json()["job"]["job_id"]
        assert second.json()["job"]["job_id"] == job_id
        assert await job_ids(api) == [job_id]
        shown = (await api.get(f"/api/v1/jobs/{job_id}")).json()
    assert [e["reason"] for e in shown["events"]] == ["submitted"]


async def test_without_a_key_or_with_another_key_each_submission_is_a_job(
    orchestrator: Orchestrator,
) -> None:
    async with api_client(orchestrator, API_HEADERS) as api:
        for headers in (API_HEADERS, API_HEADERS, keyed("a"), keyed("b")):
            assert (await api.post("/api/v1/jobs", json=TRAIN, headers=headers)).status_code == 201
        assert len(set(await job_ids(api))) == 4


async def test_the_same_key_with_another_submission_is_refused_and_creates_nothing(
    orchestrator: Orchestrator,
) -> None:
    async with api_client(orchestrator, API_HEADERS) as api:
        first = await api.post("/api/v1/jobs", json=TRAIN, headers=keyed("k-1"))
        other = {**TRAIN, "command": ["python", "eval.py"]}
        refused = await api.post("/api/v1/jobs", json=other, headers=keyed("k-1"))
        assert refused.status_code == 409, refused.text
        job_id = first.json()["job"]["job_id"]
        assert refused.json() == {
            "detail": f"Idempotency-Key 'k-1' was given in the last day with another "
            f"submission (job {job_id}); use a new key for a new job"
        }
        assert await job_ids(api) == [job_id]


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("", "at least 1 character"),
        ("k" * 129, "at most 128 characters"),
        ("two words", "should match pattern"),
        ("naïve", "should match pattern"),
    ],
)
async def test_a_malformed_key_is_refused_and_creates_nothing(
    orchestrator: Orchestrator, key: str, says: str
) -> None:
    async with api_client(orchestrator, API_HEADERS) as api:
        resp = await api.post("/api/v1/jobs", json=TRAIN, headers={"Idempotency-Key": key.encode()})
        assert resp.status_code == 400, resp.text
        assert resp.json()["detail"].startswith("header.Idempotency-Key: ")
        assert says in resp.json()["detail"]
        assert await job_ids(api) == []


async def test_a_key_is_forgotten_after_a_day(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    async with api_client(orchestrator, API_HEADERS) as api:
        first = (await api.post("/api/v1/jobs", json=TRAIN, headers=keyed("daily"))).json()
        clock.advance(DAY_SECONDS - 1)
        same = (await api.post("/api/v1/jobs", json=TRAIN, headers=keyed("daily"))).json()
        assert same["job"]["job_id"] == first["job"]["job_id"]
        clock.advance(2)  # a day and a second: not yet pruned, and forgotten all the same
        other = {**TRAIN, "command": ["python", "eval.py"]}
        fresh = await api.post("/api/v1/jobs", json=other, headers=keyed("daily"))
        assert fresh.status_code == 201, fresh.text
        assert fresh.json()["job"]["job_id"] != first["job"]["job_id"]
        assert len(await job_ids(api)) == 2
        # The log pruning's pass deletes what is over a day old: the fresh key stays.
        long_ago = clock.now() - timedelta(days=365)
        clock.advance(DAY_SECONDS - 1)
        await orchestrator.prune_job_logs()
        async with orchestrator.sessions() as session:
            kept = await jobs_repo.idempotency_key(session, key="daily", since=long_ago)
        assert kept is not None and str(kept.job_id) == fresh.json()["job"]["job_id"]
        clock.advance(2)
        await orchestrator.prune_job_logs()
        async with orchestrator.sessions() as session:
            assert await jobs_repo.idempotency_key(session, key="daily", since=long_ago) is None


@contextlib.contextmanager
def both_read_before_either_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The first two look-ups of a key wait for each other: both submissions see no key
    and both try to create a job, as two orchestrators answering at the same instant."""
    barrier = asyncio.Barrier(2)
    real = jobs_repo.idempotency_key
    calls = 0

    async def look_up(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        found = await real(*args, **kwargs)
        if calls <= 2:
            await asyncio.wait_for(barrier.wait(), 10)
        return found

    monkeypatch.setattr(jobs_repo, "idempotency_key", look_up)
    yield
    assert calls >= 3, "the submission that lost the race looked the key up again"


async def test_two_orchestrators_answering_one_key_at_once_create_one_job(
    orchestrator: Orchestrator,
    settings: OrchestratorSettings,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The database decides: the key's primary key refuses the second row, and the
    # submission that lost answers with the winner's job (SQLite: one writer at a time).
    other = Orchestrator(settings, clock=clock)
    await other.start(sweep=False)
    try:
        async with (
            api_client(orchestrator, API_HEADERS) as one,
            api_client(other, API_HEADERS) as two,
        ):
            with both_read_before_either_writes(monkeypatch):
                answers = await asyncio.gather(
                    one.post("/api/v1/jobs", json=TRAIN, headers=keyed("raced")),
                    two.post("/api/v1/jobs", json=TRAIN, headers=keyed("raced")),
                )
            assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
            ids = {a.json()["job"]["job_id"] for a in answers}
            assert len(ids) == 1 and await job_ids(one) == list(ids)
    finally:
        await other.stop()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_many_submissions_with_one_key_at_once_create_one_job_on_postgresql(
    orchestrator: Orchestrator,
) -> None:
    async with api_client(orchestrator, API_HEADERS) as api:
        answers = await asyncio.gather(
            *(api.post("/api/v1/jobs", json=TRAIN, headers=keyed("burst")) for _ in range(12))
        )
        assert {a.status_code for a in answers} == {201}
        ids = {a.json()["job"]["job_id"] for a in answers}
        assert len(ids) == 1 and await job_ids(api) == list(ids)


async def test_a_client_whose_reply_was_lost_gets_its_job_back_not_a_second(
    orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first POST reaches the orchestrator and creates the job; its reply never
    # arrives (the orchestrator killed, the network cut): the client times out.
    keys: list[str | None] = []
    real = httpx.HTTPTransport.handle_request

    def reply_lost_once(transport: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        response = real(transport, request)
        if request.method == "POST":
            keys.append(request.headers.get("idempotency-key"))
            if len(keys) == 1:
                response.close()
                raise httpx.ReadTimeout("the reply was lost", request=request)
        return response

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", reply_lost_once)
    async with serving(orchestrator) as url, api_client(orchestrator, API_HEADERS) as api:

        def submit_twice() -> list[str]:
            with Client(url, token=API_TOKEN) as chiffon:
                return [str(chiffon.submit(["python", "train.py"]).job.job_id) for _ in "12"]

        first, second = await asyncio.to_thread(submit_twice)
        # The first call sent twice with one key, and got the job its first try made;
        # the second call is another job, with a key of its own.
        assert len(keys) == 3 and keys[0] == keys[1] and keys[2] not in (keys[0], None)
        assert first != second and sorted(await job_ids(api)) == sorted([first, second])
