"""NVIDIA GPUs through `nvidia-smi` when NVML is not usable: one bounded subprocess a pass.

Fields such as `[N/A]` or `[Not Supported]` are unknown, never zero. A run past its
timeout, or one writing more than `MAX_OUTPUT_BYTES`, is killed with its whole process group
(`chiffon.agent.bounded.run_bounded`). One row nvidia-smi answers implausibly is named in
`probe_errors` and the other GPUs are kept.
"""

from __future__ import annotations

import csv
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
        return parse(stdout)

    def close(self) -> None:
        pass
