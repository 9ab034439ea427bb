"""NVIDIA GPUs through `nvidia-smi` when NVML is not usable: one bounded subprocess a pass.

Fields such as `[N/A]` or `[Not Supported]` are unknown, never zero. A run past its
timeout, or one writing more than `MAX_OUTPUT_BYTES`, is killed with its whole process group
(`chiffon.agent.bounded.run_bounded`). One row nvidia-smi answers implausibly is named in
`probe_errors` and the other GPUs are kept.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
import subprocess

from chiffon.agent.bounded import OutputTooLarge, run_bounded
from chiffon.agent.probes.common import BYTES_PER_MIB, PartialRead, ProbeError, gpu_or_bare
from chiffon.agent.report import GpuReading

# 64 GPUs (the wire's limit) at about 150 bytes a row is 10 KB; a little room for warnings.
MAX_OUTPUT_BYTES = 64 * 1024

QUERY_FIELDS = (
    "index",
    "uuid",
    "name",
    "memory.total",
    "memory.free",
    "utilization.gpu",
    "temperature.gpu",
)


APP_FIELDS = ("gpu_uuid", "pid", "used_memory")


def apps_command(executable: str) -> list[str]:
    return [executable, f"--query-compute-apps={','.join(APP_FIELDS)}",
            "--format=csv,noheader,nounits"]  # fmt: skip


def parse_apps(output: str) -> dict[str, tuple[tuple[int, float], ...]] | None:
    """Compute processes by GPU UUID, (pid, GB); None when a row cannot be read (then no
    GPU's list can be trusted whole)."""
    found: dict[str, dict[int, float]] = {}
    for cells in csv.reader(line for line in output.splitlines() if line.strip()):
        if len(cells) != len(APP_FIELDS):
            return None
        row = dict(zip(APP_FIELDS, cells, strict=True))
        uuid, pid, used = _field(row["gpu_uuid"]), _number(row["pid"]), _mib(row["used_memory"])
        if uuid is None or pid is None or used is None:
            return None
        found.setdefault(uuid, {})[int(pid)] = round(used / 1e9, 3)
    return {uuid: tuple(sorted(held.items())) for uuid, held in found.items()}


def command(executable: str) -> list[str]:
    return [
        executable,
        f"--query-gpu={','.join(QUERY_FIELDS)}",
        "--format=csv,noheader,nounits",
    ]


def _field(value: str) -> str | None:
    value = value.strip()
    if not value or (value.startswith("[") and value.endswith("]")) or value == "N/A":
        return None
    return value


def _number(value: str) -> float | None:
    text = _field(value)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _mib(value: str) -> float | None:
    mib = _number(value)
    return None if mib is None else mib * BYTES_PER_MIB


def parse(output: str) -> list[GpuReading]:
    """`--format=csv,noheader,nounits` lines, in `QUERY_FIELDS` order, to GPUs.

    A row that cannot be read, or reads implausibly, is named in a `PartialRead` beside the
    GPUs that could: one bad row never hides a good one.
    """
    gpus: list[GpuReading] = []
    problems: list[str] = []
    for cells in csv.reader(line for line in output.splitlines() if line.strip()):
        if len(cells) != len(QUERY_FIELDS):
            problems.append(f"expected {len(QUERY_FIELDS)} fields, got {len(cells)}")
            continue
        row = dict(zip(QUERY_FIELDS, cells, strict=True))  # by name, never by position
        index = _number(row["index"])
        gpus.append(
            gpu_or_bare(
                problems,
                index=len(gpus) if index is None else int(index),
                vendor="nvidia",
                uuid=_field(row["uuid"]),
                name=_field(row["name"]),
                vram_total_bytes=_mib(row["memory.total"]),
                vram_free_bytes=_mib(row["memory.free"]),
                utilization_percent=_number(row["utilization.gpu"]),
                temperature_c=_number(row["temperature.gpu"]),
            )
        )
    if problems:
        raise PartialRead(gpus, [f"nvidia-smi: {p}" for p in problems])
    return gpus


class NvidiaSmiProbe:
    name = "nvidia-smi"

    def __init__(self, *, timeout_seconds: float, executable: str = "nvidia-smi") -> None:
        self.timeout_seconds = timeout_seconds
        self.executable = executable

    def available(self) -> bool:
        return shutil.which(self.executable) is not None

    def read(self) -> list[GpuReading]:
        path = shutil.which(self.executable)
        if path is None:
            return []
        try:
            done = run_bounded(
                command(path),
                timeout_seconds=self.timeout_seconds,
                max_output_bytes=MAX_OUTPUT_BYTES,
            )
        except subprocess.TimeoutExpired:
            raise ProbeError(
                f"nvidia-smi timed out after {self.timeout_seconds:g} s (killed)"
            ) from None
        except OutputTooLarge as exc:
            raise ProbeError(f"nvidia-smi {exc} (killed)") from None
        except OSError as exc:
            raise ProbeError(f"nvidia-smi could not run: {exc}") from None
        stdout = done.stdout.decode(errors="replace")
        if done.returncode != 0:
            said = (done.stderr.decode(errors="replace") or stdout).strip().splitlines()
            raise ProbeError(
                f"nvidia-smi exited {done.returncode}: {said[0] if said else 'no output'}"
            )
        return self._with_processes(path, parse(stdout))  # a partial read: processes unknown

    def _with_processes(self, path: str, gpus: list[GpuReading]) -> list[GpuReading]:
        """Each GPU with its compute processes (a second bounded run); unknown when that
        run fails, whatever the reason: the GPUs' own numbers stand."""
        try:
            done = run_bounded(apps_command(path), timeout_seconds=self.timeout_seconds,
                               max_output_bytes=MAX_OUTPUT_BYTES)  # fmt: skip
        except (subprocess.TimeoutExpired, OutputTooLarge, OSError):
            return gpus
        apps = parse_apps(done.stdout.decode(errors="replace")) if done.returncode == 0 else None
        if apps is None:
            return gpus
        return [
            dataclasses.replace(g, processes=apps.get(g.uuid, ())) if g.uuid else g for g in gpus
        ]

    def close(self) -> None:
        pass
