"""No double-booking, ever: 200 jobs submitted at once to two `chiffon orchestrator`
processes sharing one PostgreSQL, over three real agents with known GPUs (fake
nvidia-smi). While they run, the claims on each GPU are sampled and never exceed its free
memory; at the end every job ran exactly once (each appends its id to one file)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg

from tests.auth import API_HEADERS
from tests.fakes.nvidia_smi import gpu_row
from tests.fleet import fleet_on, wait_for
from tests.procs import free_port, stop, wait_http
from tests.test_jobs_e2e import ACCEPTS

JOBS = 200
VRAM_GB = 3.0
# Three desktops; each GPU's free memory in GB (MiB x 2^20 / 10^9), as the agent reports it.
DESKS = {
    "desk-a": [gpu_row(0, total_mib="8192", free_mib="7629")],
    "desk-b": [gpu_row(0, free_mib="20000"), gpu_row(1, free_mib="23975")],
    "desk-c": [gpu_row(0, total_mib="12288", free_mib="12000")],
}


def test_two_orchestrators_never_double_book_and_every_job_runs_once(
    tmp_path: Path, job_visible_dir: Path
) -> None:
    ran = job_visible_dir / "ran.txt"  # each job appends a line: seen outside its sandbox
    with fleet_on("http", tmp_path, None) as fleet:
        # A second orchestrator on the same database, with the same keys.
        command, env = fleet.orchestrator_cmd
        port = free_port()
        second_cmd = [*command[: command.index("--port") + 1], str(port)]
        log = (tmp_path / "orchestrator-2.log").open("w")
        second = subprocess.Popen(second_cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  text=True)  # fmt: skip
        try:
            second_api = f"http://127.0.0.1:{port}"
            wait_http(f"{second_api}/healthz", second)
            for name, rows in DESKS.items():  # desk-c long-polls the second orchestrator
                url = second_api if name == "desk-c" else fleet.api
                fleet.start_agent(name, gpus=rows, CHIFFON_ORCHESTRATOR_URL=url, **ACCEPTS)
            wait_for("three agents online", lambda: len(_online(fleet.api)) == 3, fleet, 30)
            capacity = _free_by_gpu(fleet.api)
            assert len(capacity) == 4, capacity
            database = env["CHIFFON_DATABASE_URL"]
            overbooked: list[str] = []
            most: Counter[tuple[str, str]] = Counter()  # the most claimed seen on each GPU
            sampling = threading.Event()
            sampler = threading.Thread(
                target=_sample, args=(database, capacity, overbooked, most, sampling), daemon=True
            )
            sampler.start()
            script = f'echo "$CHIFFON_JOB_ID" >> {ran}; sleep 0.2'
            spec = {"command": ["sh", "-c", script],
                    "requirements": {"gpus": 1, "vram_gb": VRAM_GB}}  # fmt: skip
            apis = [fleet.api, second_api]
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(lambda i: _submit(apis[i % 2], spec), range(JOBS)))
            assert all(a.status_code == 201 for a in answers), [a.text for a in answers][:3]
            ids = {a.json()["job"]["job_id"] for a in answers}
            wait_for("every job to end", lambda: _all_ended(fleet.api, ids), fleet, 240)
            sampling.set()
            sampler.join(10)
        finally:
            stop(second)
            log.close()
        jobs = httpx.get(f"{fleet.api}/api/v1/jobs", params={"limit": 1000},
                         headers=API_HEADERS, timeout=10).json()  # fmt: skip
    assert overbooked == []
    # The sampler saw the GPUs busy (it checked something): the 25 GB GPU held as many 3 GB
    # claims as fit on it, and the GPUs' busiest moments add up to at least 10 jobs.
    assert sum(most.values()) >= 10 * VRAM_GB and max(most.values()) == 8 * VRAM_GB, most
    assert Counter(j["state"] for j in jobs) == {"succeeded": JOBS}
    assert all(j["attempt"] == 1 for j in jobs)  # never placed twice
    lines = ran.read_text().split()
    assert len(lines) == JOBS and set(lines) == ids  # each ran exactly once


def _submit(api: str, spec: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{api}/api/v1/jobs", json=spec, headers=API_HEADERS, timeout=30)


def _online(api: str) -> list[str]:
    rows = httpx.get(f"{api}/api/v1/agents", headers=API_HEADERS, timeout=5).json()
    return [r["name"] for r in rows if r["status"] == "online"]


def _free_by_gpu(api: str) -> dict[tuple[str, str], float]:
    """Each GPU's free memory by (agent, claim resource): the fake desktops' GPUs 0 share
    a UUID, so a GPU is known by its agent too."""
    rows = httpx.get(f"{api}/api/v1/agents", headers=API_HEADERS, timeout=5).json()
    return {
        (r["agent_id"], f"gpu:{g['uuid']}"): g["vram_free_gb"]
        for r in rows
        for g in r["resource_metrics"].get("gpus", [])
    }


def _sample(
    database: str,
    capacity: dict[tuple[str, str], float],
    overbooked: list[str],
    most: Counter[tuple[str, str]],
    done: threading.Event,
) -> None:
    """Every 20 ms: the claims on each GPU, summed; any sum over its free memory is noted."""
    conninfo = database.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        while not done.is_set():
            rows = conn.execute(
                "SELECT agent_id, resource, sum(vram_gb) FROM job_claims "
                "WHERE resource <> 'host' GROUP BY agent_id, resource"
            ).fetchall()
            for agent, resource, claimed in rows:
                gpu = (str(agent), resource)
                most[gpu] = max(most[gpu], float(claimed))
                if float(claimed) > capacity.get(gpu, 0.0) + 1e-9:
                    overbooked.append(f"{agent} {resource}: {claimed} GB claimed")
            time.sleep(0.02)


def _all_ended(api: str, ids: set[str]) -> bool:
    jobs = httpx.get(f"{api}/api/v1/jobs", params={"limit": 1000}, headers=API_HEADERS,
                     timeout=10).json()  # fmt: skip
    ended = {j["job_id"] for j in jobs if j["state"] in ("succeeded", "failed", "lost")}
    return ids <= ended
