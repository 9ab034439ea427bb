"""The agent's footprint on the desktop: memory, CPU and the cost of one probe pass.

Runs `chiffon agent` at its default interval (15 s) against a local orchestrator (over
HTTP unless `--transport amqp`) for `--duration` seconds (default 300), and beside it, in
the same run, a peer doing a similar job: Prometheus' node_exporter (Debian's
prometheus-node-exporter), scraped over HTTP at the same interval by this script. For
each: RSS at the end and its peak (VmHWM), and average CPU over the measured window from
/proc/<pid>/stat (user + system; the first
`--warmup` seconds, the start-up, are left out and reported separately).

The probe pass is timed in-process: `Collector.collect()` as the agent runs it, with no
GPU backend answering (this machine) and with the test suite's fake NVML module answering
for 1 and 8 GPUs (our own overhead on the NVML path, not a real driver's latency).

    .venv/bin/python bench/agent_footprint.py [--duration 300] [--warmup 20]
                                              [--transport http|amqp] [--results NAME]

With `--transport amqp` the agent publishes to RabbitMQ (a private virtual host, deleted
afterwards) and the orchestrator consumes from it; the agent still enrolls over HTTP.

Needs /usr/bin/prometheus-node-exporter (apt-get install prometheus-node-exporter); it is
started on a free port by this script and ended by its pid, never as a system service.
Takes about duration + warmup + 30 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CHIFFON,
    api_headers,
    auth_env,
    cpu_seconds,
    free_port,
    machine,
    orchestrator,
    private_vhost,
    rss_mb,
    stop,
    write_results,
)

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
INTERVAL_SECONDS = 15.0


def probe_pass_ms(passes: int = 300) -> dict[str, float]:
    """Median and p99 of `Collector.collect()` in ms, per GPU setup."""
    from tests.fakes import fake_pynvml
    from tests.fakes.fake_pynvml import FakeGpu

    from chiffon.agent.probes.collect import Collector, FirstAvailable
    from chiffon.agent.probes.nvidia_smi import NvidiaSmiProbe
    from chiffon.agent.probes.nvml import NvmlProbe

    def timed(collector: Collector) -> tuple[float, float]:
        for _ in range(20):
            collector.collect()
        samples = []
        for _ in range(passes):
            started = time.perf_counter()
            collector.collect()
            samples.append((time.perf_counter() - started) * 1000)
        collector.close()
        samples.sort()
        return statistics.median(samples), samples[int(0.99 * len(samples)) - 1]

    out: dict[str, float] = {}
    out["no_gpu_p50"], out["no_gpu_p99"] = timed(Collector([], timeout_seconds=5))
    for gpus in (1, 8):
        fake_pynvml.reset([FakeGpu(uuid=f"GPU-{i}") for i in range(gpus)])
        nvml = FirstAvailable("nvidia", NvmlProbe(fake_pynvml), NvidiaSmiProbe(timeout_seconds=5))
        out[f"nvml_{gpus}gpu_p50"], out[f"nvml_{gpus}gpu_p99"] = timed(
            Collector([nvml], timeout_seconds=5)
        )
    return out


def children_of(pid: int) -> int:
    """Processes ever started by `pid` and reaped (cumulative, from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[13]) + int(fields[14])  # cutime + cstime ticks: > 0 if children ran


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if args.transport == "amqp":
        with private_vhost() as amqp_url:
            return measure_with(args, tmp, ["--amqp-url", amqp_url])
    return measure_with(args, tmp, [])


def measure_with(args: argparse.Namespace, tmp: Path, amqp: list[str]) -> dict[str, Any]:
    """The agent beats over HTTP, or over RabbitMQ (`amqp`: ["--amqp-url", URL]) into an
    orchestrator consuming the same broker; it enrolls over HTTP either way."""
    db_url = f"sqlite:///{tmp / 'registry.db'}"
    subprocess.run([*CHIFFON, "db", "upgrade", "--database-url", db_url], check=True)
    with orchestrator(db_url, *amqp, log=tmp / "orchestrator.log") as (api, _orch):
        agent_log = (tmp / "agent.log").open("w")
        agent = subprocess.Popen(
            [
                *CHIFFON,
                "agent",
                "--orchestrator-url",
                api,
                "--state-dir",
                str(tmp / "state"),
                "--transport",
                args.transport,
                *amqp,
            ],
            env={**os.environ, **auth_env(), "HOME": str(tmp)},
            stdout=agent_log,
            stderr=subprocess.STDOUT,
        )
        port = free_port()
        exporter = subprocess.Popen(
            [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            return watch(args, api, agent, exporter, f"http://127.0.0.1:{port}/metrics")
        finally:
            stop(agent)
            stop(exporter)
            agent_log.close()


def watch(
    args: argparse.Namespace,
    api: str,
    agent: subprocess.Popen[bytes],
    exporter: subprocess.Popen[bytes],
    scrape_url: str,
) -> dict[str, Any]:
    pids = {"chiffon agent": agent.pid, "node_exporter": exporter.pid}
    started = time.monotonic()
    scrapes = 0
    scrape_bytes = 0
    marks: dict[str, float] = {}
    peak_rss = dict.fromkeys(pids, 0.0)
    next_scrape = started + 2  # let node_exporter bind its port
    while time.monotonic() - started < args.warmup + args.duration:
        now = time.monotonic()
        if now >= next_scrape:
            scrape_bytes = len(httpx.get(scrape_url, timeout=5).content)
            scrapes += 1
            next_scrape += INTERVAL_SECONDS
        if not marks and now - started >= args.warmup:
            marks = {name: cpu_seconds(pid) for name, pid in pids.items()}
            marks["_at"] = now
            startup_cpu = dict(marks)
        for name, pid in pids.items():
            peak_rss[name] = max(peak_rss[name], rss_mb(pid))
        time.sleep(0.5)
    window = time.monotonic() - marks["_at"]
    heard = httpx.get(f"{api}/api/v1/agents", headers=api_headers(), timeout=5).json()
    result: dict[str, Any] = {"window_seconds": window, "scrapes": scrapes}
    for name, pid in pids.items():
        used = cpu_seconds(pid) - marks[name]
        result[name] = {
            "rss_mb": rss_mb(pid),
            "rss_peak_mb": rss_mb(pid, "VmHWM"),
            "cpu_seconds_in_window": used,
            "cpu_percent_of_one_core": 100 * used / window,
            "startup_cpu_seconds": startup_cpu[name],
            "child_cpu_ticks": children_of(pid),
        }
    result["node_exporter"]["scrape_bytes"] = scrape_bytes
    metrics = heard[0]["resource_metrics"] if heard else {}
    result["chiffon agent"]["collection_ms_last_beat"] = metrics.get("collection_ms")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--transport", choices=("http", "amqp"), default="http")
    parser.add_argument("--results", default="agent_footprint", help="name of the JSON file")
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(tmp))
    probes = probe_pass_ms()
    print(
        f"over {result['window_seconds']:.0f} s at a {INTERVAL_SECONDS:g} s interval, "
        f"heartbeats over {args.transport}:"
    )
    print(f"{'process':<16}{'RSS MB':>8}{'peak MB':>9}{'CPU s':>8}{'% of a core':>13}")
    for name in ("chiffon agent", "node_exporter"):
        r = result[name]
        print(
            f"{name:<16}{r['rss_mb']:>8.1f}{r['rss_peak_mb']:>9.1f}"
            f"{r['cpu_seconds_in_window']:>8.2f}{r['cpu_percent_of_one_core']:>12.3f}%"
        )
    print("probe pass (Collector.collect, in-process), ms:")
    for key, value in probes.items():
        print(f"  {key:<16}{value:>8.3f}")
    write_results(
        args.results,
        {"machine": info, "args": vars(args), "processes": result, "probe_pass_ms": probes},
    )


if __name__ == "__main__":
    main()
