"""Code in and results out (docs/performance.md): what `chiffon run` costs for a 200 MB
project folder of 2,000 files, beside what this machine's disk and loopback allow.

`chiffon orchestrator` on a fresh PostgreSQL database (its default store: blobs in the
database) and one real `chiffon agent` that accepts jobs, its GPU a fake nvidia-smi. Each
round makes a new folder of 2,000 files of 100 kB of random bytes in 10 subfolders, then:

1. **Ceilings**, in the same run: `cp -r` of the folder; one 200 MB body downloaded over
   127.0.0.1 from `python -m http.server` (httpx, streamed) and uploaded to a minimal
   uvicorn app that reads and discards it; and 2,000 PUTs of 100 kB to that app, 8 at a
   time as `chiffon run` sends them (the per-request floor).
2. **First submit**: `chiffon run --detach -- python3 -c pass` in the folder, timed as its
   user sees it (command start to job id printed), and the "sending ..." line it printed.
   On the agent: the attempt's assigned_at -> started_at (stage-in with a cold cache).
3. **Second submit, one file changed**: the same; then the same in process, split into
   snapshot (listing + hashing), ask (which blobs are missing), upload, submit.
4. **Cache hit**: the first submit's snapshot submitted again (no upload): its attempt's
   assigned_at -> started_at is lay-out only.

    .venv/bin/python bench/staging.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    API_TOKEN,
    CHIFFON,
    CpuWatch,
    auth_env,
    free_port,
    fresh_postgres,
    machine,
    orchestrator,
    stop,
    wait_http,
    write_results,
)
from tests.fakes.nvidia_smi import gpu_row
from tests.fakes.nvidia_smi import install as install_smi

from chiffon.cli.sync import TRANSFERS, send, snapshot
from chiffon.client import Client

MB = 1_000_000
FILES, FILE_BYTES, FOLDERS = 2_000, 100_000, 10
SENDING = re.compile(r"sending (\d+) files?, ([\d.]+) (\w+); .*; (\d+) new")
UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
COMMAND = ["python3", "-c", "pass"]
STALL_SECONDS = 240.0  # a job of `pass` not ended by then is stuck, not slow
# The store's body limit is not what is measured: a folder of 200 MB fits the default cap.
SINK_APP = """
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})

uvicorn.run(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), log_level="warning")
"""


def make_folder(root: Path) -> Path:
    """2,000 files of 100 kB of random bytes in 10 subfolders."""
    for i in range(FILES):
        folder = root / f"part{i % FOLDERS:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file{i:04d}.bin").write_bytes(os.urandom(FILE_BYTES))
    return root


def change_one(root: Path) -> None:
    (root / "part00" / "file0000.bin").write_bytes(os.urandom(FILE_BYTES))


def _mb_s(n_bytes: float, seconds: float) -> float:
    return round(n_bytes / MB / seconds, 1)


# ---- 1. ceilings ------------------------------------------------------------------------


def ceilings(folder: Path, tmp: Path) -> dict[str, Any]:
    total = FILES * FILE_BYTES
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(folder), str(tmp / "copy")], check=True)
    copy_s = time.perf_counter() - started
    shutil.rmtree(tmp / "copy")
    big = tmp / "served" / "body.bin"
    big.parent.mkdir()
    with big.open("wb") as f:
        for _ in range(total // (10 * MB)):
            f.write(os.urandom(10 * MB))
    with _server([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                  "--directory", str(big.parent)]) as url:  # fmt: skip
        down_s = _download(f"{url}/body.bin")
    with _server([sys.executable, "-c", SINK_APP]) as url:
        up_s = _upload(url, big)
        puts_s = _small_puts(url, folder)
    shutil.rmtree(big.parent)
    return {
        "cp_r": {"seconds": round(copy_s, 3), "mb_s": _mb_s(total, copy_s)},
        "http_download_one_body": {"seconds": round(down_s, 3), "mb_s": _mb_s(total, down_s)},
        "http_upload_one_body": {"seconds": round(up_s, 3), "mb_s": _mb_s(total, up_s)},
        f"http_upload_{FILES}_puts_{TRANSFERS}_at_once": {
            "seconds": round(puts_s, 3),
            "mb_s": _mb_s(total, puts_s),
        },
    }


@contextmanager
def _server(command: list[str]) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([*command, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_port(url, proc)
        yield url
    finally:
        stop(proc)


def _wait_port(url: str, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(url)


def _download(url: str) -> float:
    started = time.perf_counter()
    with httpx.stream("GET", url, timeout=60) as response:
        response.raise_for_status()
        for _ in response.iter_bytes(1024 * 1024):
            pass
    return time.perf_counter() - started


def _upload(url: str, body: Path) -> float:
    started = time.perf_counter()
    with body.open("rb") as f:
        httpx.put(f"{url}/sink", content=f, timeout=60).raise_for_status()
    return time.perf_counter() - started


def _small_puts(url: str, folder: Path) -> float:
    files = sorted(folder.rglob("*.bin"))
    with httpx.Client(base_url=url, timeout=60) as http:
        started = time.perf_counter()
        with ThreadPoolExecutor(TRANSFERS) as pool:
            list(pool.map(lambda p: http.put("/sink", content=p.read_bytes()), files))
        return time.perf_counter() - started


# ---- 2-4. chiffon run ---------------------------------------------------------------------


def cli_submit(folder: Path, api: str) -> dict[str, Any]:
    """`chiffon run --detach` in `folder`: wall seconds to the job id, and its sending line."""
    env = {**os.environ, "CHIFFON_ORCHESTRATOR_URL": api, "CHIFFON_API_TOKEN": API_TOKEN}
    cpu = _children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run([*CHIFFON, "run", "--detach", "--", *COMMAND], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    wall = time.perf_counter() - started
    client_cpu = _children_cpu_s() - cpu
    if done.returncode != 0:
        raise SystemExit(f"chiffon run failed ({done.returncode}): {done.stderr}")
    line = SENDING.search(done.stderr)
    if line is None:
        raise SystemExit(f"no sending line in: {done.stderr!r}")
    files, size, unit, new = line.groups()
    sent = int(new) * FILE_BYTES
    return {"job_id": done.stdout.strip(), "wall_seconds": round(wall, 3), "files": int(files),
            "mb": float(size) * UNITS[unit] / MB, "new": int(new),
            "upload_mb_s": _mb_s(sent, wall) if int(new) else None,
            "client_cpu_s": round(client_cpu, 2), "line": line.group(0)}  # fmt: skip


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def in_process_submit(folder: Path, c: Client) -> dict[str, Any]:
    """The same as `chiffon run --detach`, split into its parts (no interpreter start)."""
    t0 = time.perf_counter()
    snap = snapshot(folder, max_bytes=10**12)
    t1 = time.perf_counter()
    missing = c.missing_blobs(snap.manifest.blobs() | {snap.digest})
    t2 = time.perf_counter()
    digest = send(c, snap, lambda _line: None)  # asks again: subtracted below
    t3 = time.perf_counter()
    accepted = c.submit(COMMAND, snapshot=digest)
    t4 = time.perf_counter()
    ask = t2 - t1
    return {"job_id": str(accepted.job.job_id), "new": len(missing - {snap.digest}),
            "snapshot_s": round(t1 - t0, 3), "ask_s": round(ask, 3),
            "upload_s": round(max(0.0, t3 - t2 - ask), 3), "submit_s": round(t4 - t3, 3),
            "total_s": round(t4 - t0 - ask, 3)}  # fmt: skip


class Stalled(RuntimeError):
    """A job that did not end within the wait: what was seen is kept with the results."""


def stage(c: Client, job_id: str) -> dict[str, Any]:
    """The job's end, and its attempt's assigned_at -> started_at (which holds stage-in)."""
    try:
        final = c.wait(job_id, timeout_seconds=STALL_SECONDS)
    except TimeoutError as exc:
        raise Stalled(str(exc)) from None
    if final.state != "succeeded":
        raise SystemExit(f"job {job_id} {final.state}: {final.reason}")
    job = c.get(job_id)
    [attempt] = job.attempts
    assert attempt.started_at is not None
    queued = attempt.assigned_at - job.submitted_at
    staged = attempt.started_at - attempt.assigned_at
    return {"state": final.state, "snapshot_cached": attempt.snapshot_cached,
            "queued_s": round(queued.total_seconds(), 3),
            "stage_in_s": round(staged.total_seconds(), 3)}  # fmt: skip


def one_round(tmp: Path, api: str, c: Client, pids: dict[str, int]) -> dict[str, Any]:
    folder = make_folder(tmp / "project")
    out: dict[str, Any] = {"ceilings": ceilings(folder, tmp)}
    watch = CpuWatch(pids)
    first = cli_submit(folder, api)
    upload_cpu = _rounded(watch.shares())
    watch = CpuWatch(pids)
    out["first_submit"] = {**first, **stage(c, first["job_id"]), "cpu_during_upload": upload_cpu}
    out["first_submit"]["cpu_during_stage_in"] = _rounded(watch.shares())
    cold = out["first_submit"]["stage_in_s"]
    out["first_submit"]["download_mb_s_incl_lay_out"] = _mb_s(FILES * FILE_BYTES, cold)
    first_digest = c.get(first["job_id"]).snapshot
    change_one(folder)
    second = cli_submit(folder, api)
    out["second_submit"] = {**second, **stage(c, second["job_id"])}
    change_one(folder)
    parts = in_process_submit(folder, c)
    out["second_submit_in_process"] = {**parts, **stage(c, parts["job_id"])}
    again = c.submit(COMMAND, snapshot=first_digest)
    out["cache_hit"] = stage(c, str(again.job.job_id))
    hit = out["cache_hit"]["stage_in_s"]
    out["first_submit"]["download_mb_s_less_lay_out"] = (
        _mb_s(FILES * FILE_BYTES, cold - hit) if cold > hit else None
    )
    shutil.rmtree(folder)
    return out


def _rounded(shares: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in shares.items()}


def interpreter_floor() -> float:
    """`chiffon --help`: the interpreter and the CLI's imports, part of every submit."""
    started = time.perf_counter()
    subprocess.run([*CHIFFON, "--help"], capture_output=True, check=True)
    return round(time.perf_counter() - started, 3)


@contextmanager
def fleet(tmp: Path, store_dir: Path | None) -> Iterator[tuple[str, Client, dict[str, int]]]:
    with ExitStack() as stack:
        database = stack.enter_context(fresh_postgres())
        store = {"CHIFFON_STORE_DIR": str(store_dir)} if store_dir else {}
        api, orch = stack.enter_context(
            orchestrator(database, env=store, log=tmp / "orchestrator.log")
        )
        home = tmp / "agent"
        install_smi(home / "bin", rows=[gpu_row(0)], apps=[])
        env = {**os.environ, **auth_env(), "CHIFFON_ORCHESTRATOR_URL": api, "HOME": str(home),
               "PATH": f"{home / 'bin'}{os.pathsep}{os.environ['PATH']}",
               "CHIFFON_ACCEPT_JOBS": "true", "CHIFFON_ALLOW_ROOT_JOBS": "true",
               "CHIFFON_CACHE_DIR": str(home / "cache")}  # fmt: skip
        log = stack.enter_context((tmp / "agent.log").open("w"))
        agent = subprocess.Popen(
            [*CHIFFON, "agent", "--name", "staging-bench", "--state-dir", str(home / "state")],
            env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        stack.callback(stop, agent)
        c = stack.enter_context(Client(api, token=API_TOKEN, timeout_seconds=60))
        _wait_accepting(api, agent)
        yield api, c, {"orchestrator": orch.pid, "agent": agent.pid}


def _wait_accepting(api: str, agent: subprocess.Popen[Any]) -> None:
    wait_http(f"{api}/healthz", agent)
    deadline = time.monotonic() + 60
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    while time.monotonic() < deadline:
        rows = httpx.get(f"{api}/api/v1/agents", headers=headers, timeout=5).json()
        rows = rows.get("agents", rows) if isinstance(rows, dict) else rows
        if any(r.get("status") == "online" and r.get("accepts_jobs") for r in rows):
            return
        time.sleep(0.2)
    raise SystemExit("the agent did not come online accepting jobs")


def _stall(tmp: Path, round_no: int, what: str) -> dict[str, Any]:
    """What a stuck round left: the agent's cache, its connections, the processes' logs."""
    blobs = sorted(p.stat().st_mtime for p in (tmp / "agent" / "cache" / "blobs").glob("*/*"))
    tails = {name: (tmp / f"{name}.log").read_text().splitlines()[-15:]
             for name in ("agent", "orchestrator")}  # fmt: skip
    seen = {"round": round_no, "what": what, "cache_blobs": len(blobs),
            "last_blob_cached_at": time.strftime("%H:%M:%S", time.gmtime(blobs[-1])) if blobs
            else None, "logs": tails}  # fmt: skip
    print("STALLED:", seen)
    return seen


def _summary(rounds: list[dict[str, Any]], *keys: str) -> dict[str, float]:
    values = []
    for r in rounds:
        v: Any = r
        for k in keys:
            v = v[k]
        if v is not None:
            values.append(v)
    ordered = sorted(values)
    return {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1]}


SUMMARY = {
    "cp_r_mb_s": ("ceilings", "cp_r", "mb_s"),
    "http_download_mb_s": ("ceilings", "http_download_one_body", "mb_s"),
    "http_upload_mb_s": ("ceilings", "http_upload_one_body", "mb_s"),
    "http_small_puts_mb_s": ("ceilings", f"http_upload_{FILES}_puts_{TRANSFERS}_at_once", "mb_s"),
    "first_submit_wall_s": ("first_submit", "wall_seconds"),
    "first_submit_upload_mb_s": ("first_submit", "upload_mb_s"),
    "first_stage_in_cold_s": ("first_submit", "stage_in_s"),
    "cold_download_mb_s_incl_lay_out": ("first_submit", "download_mb_s_incl_lay_out"),
    "cold_download_mb_s_less_lay_out": ("first_submit", "download_mb_s_less_lay_out"),
    "second_submit_wall_s": ("second_submit", "wall_seconds"),
    "second_stage_in_s": ("second_submit", "stage_in_s"),
    "second_queued_s": ("second_submit", "queued_s"),
    "second_in_process_snapshot_s": ("second_submit_in_process", "snapshot_s"),
    "second_in_process_ask_s": ("second_submit_in_process", "ask_s"),
    "second_in_process_upload_s": ("second_submit_in_process", "upload_s"),
    "second_in_process_submit_s": ("second_submit_in_process", "submit_s"),
    "second_in_process_total_s": ("second_submit_in_process", "total_s"),
    "cache_hit_stage_in_s": ("cache_hit", "stage_in_s"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=["database", "files"], default="database",
                        help="the orchestrator's store: its default (PostgreSQL rows), or a "
                        "folder (CHIFFON_STORE_DIR)")  # fmt: skip
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()  # fmt: skip
    results: dict[str, Any] = {
        "machine": machine(), "commit": head, "store": args.store,
        "folder": {"files": FILES, "file_bytes": FILE_BYTES, "subfolders": FOLDERS},
    }  # fmt: skip
    results["cli_help_s"] = interpreter_floor()
    rounds = []
    for i in range(args.rounds):
        # A fleet of its own each round: with one agent across rounds, the second round's
        # cold stage-in stalled (docs/performance.md, "Code in and results out").
        with tempfile.TemporaryDirectory() as name:
            store = Path(name) / "store" if args.store == "files" else None
            with fleet(Path(name), store) as (api, c, pids):
                try:
                    rounds.append(one_round(Path(name), api, c, pids))
                except Stalled as exc:
                    results["stalled"] = _stall(Path(name), i + 1, str(exc))
                    break
        print(f"round {i + 1}:", {k: _summary(rounds[-1:], *v)["min"]
                                  for k, v in SUMMARY.items()})  # fmt: skip
    results["rounds"] = rounds
    if not rounds:
        write_results("staging" if args.store == "database" else "staging_store_files", results)
        raise SystemExit("no round finished")
    results["summary"] = {k: _summary(rounds, *v) for k, v in SUMMARY.items()}
    print(f"chiffon --help: {results['cli_help_s']} s")
    for key, value in results["summary"].items():
        print(f"{key:36s} {value}")
    write_results("staging" if args.store == "database" else "staging_store_files", results)


if __name__ == "__main__":
    main()
