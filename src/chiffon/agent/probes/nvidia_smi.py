"""NVIDIA GPUs through `nvidia-smi` when NVML is not usable: one bounded subprocess a pass.

Fields such as `[N/A]` or `[Not Supported]` are unknown, never zero. A run past its
timeout is killed (subprocess.run kills the child before raising).
"""

from __future__ import annotations

import csv
import shutil
import subprocess

from chiffon.agent.probes.common import BYTES_PER_MIB, ProbeError, make_gpu
from chiffon.agent.report import GpuReading

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
    """`--format=csv,noheader,nounits` lines, in `QUERY_FIELDS` order, to GPUs."""
    gpus: list[GpuReading] = []
    for row in csv.reader(line for line in output.splitlines() if line.strip()):
        if len(row) != len(QUERY_FIELDS):
            raise ProbeError(f"nvidia-smi: expected {len(QUERY_FIELDS)} fields, got {row!r}")
        index = _number(row[0])
        gpus.append(
            make_gpu(
                index=len(gpus) if index is None else int(index),
                vendor="nvidia",
                uuid=_field(row[1]),
                name=_field(row[2]),
                vram_total_bytes=_mib(row[3]),
                vram_free_bytes=_mib(row[4]),
                utilization_percent=_number(row[5]),
                temperature_c=_number(row[6]),
            )
        )
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
            done = subprocess.run(
                command(path),
                capture_output=True,
                text=True,
                timeout=self.timeout_seconds,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ProbeError(
                f"nvidia-smi timed out after {self.timeout_seconds:g} s (killed)"
            ) from None
        except OSError as exc:
            raise ProbeError(f"nvidia-smi could not run: {exc}") from None
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            raise ProbeError(
                f"nvidia-smi exited {done.returncode}: {said[0] if said else 'no output'}"
            )
        return parse(done.stdout)

    def close(self) -> None:
        pass
