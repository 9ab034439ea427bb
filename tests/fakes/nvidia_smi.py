"""A fake `nvidia-smi` executable answering the real `--query-gpu` CSV format."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

SCRIPT = """#!{python}
import json, os, sys, time
spec = json.load(open({spec!r}))
open({pid_file!r}, "w").write(str(os.getpid()))
query = [a for a in sys.argv[1:] if a.startswith("--query-gpu=")]
apps = [a for a in sys.argv[1:] if a.startswith("--query-compute-apps=")]
if apps and spec["apps"] is not None and "--format=csv,noheader,nounits" in sys.argv:
    for row in spec["apps"]:
        print(", ".join(row))
    sys.exit(0)
if not query or "--format=csv,noheader,nounits" not in sys.argv:
    print("fake nvidia-smi: unexpected arguments", sys.argv[1:], file=sys.stderr)
    sys.exit(2)
if spec["child_pid_file"]:  # a wrapper: its child keeps running unless its group is killed
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(spec["child_pid_file"], "w").write(str(child.pid))
if spec["stream_forever"]:
    line = (", ".join(spec["rows"][0]) if spec["rows"] else "x" * 100) + chr(10)
    while True:
        sys.stdout.write(line * 100)
if spec["hang_seconds"]:
    time.sleep(spec["hang_seconds"])
if spec["exit_code"]:
    print(spec["stderr"], file=sys.stderr)
    sys.exit(spec["exit_code"])
for row in spec["rows"]:
    print(", ".join(row))
"""


def gpu_row(
    index: int,
    *,
    total_mib: str = "24564",
    free_mib: str = "23975",
    util: str = "3",
    temp: str = "38",
    name: str = "NVIDIA GeForce RTX 4090",
) -> list[str]:
    uuid = f"GPU-{index:08d}-aaaa-bbbb-cccc-dddddddddddd"
    return [str(index), uuid, name, total_mib, free_mib, util, temp]


def install(
    bin_dir: Path,
    *,
    rows: list[list[str]] | None = None,
    hang_seconds: float = 0,
    exit_code: int = 0,
    stderr: str = "",
    stream_forever: bool = False,
    child_pid_file: Path | None = None,
    apps: list[list[str]] | None = None,
) -> Path:
    """`apps`: rows of `--query-compute-apps=gpu_uuid,pid,used_memory` (None: that query
    is refused, as by a driver too old for it)."""
    # Writes `bin_dir/nvidia-smi`; returns the file where each run writes its pid.
    bin_dir.mkdir(parents=True, exist_ok=True)
    spec = bin_dir / "nvidia-smi.json"
    pid_file = bin_dir / "nvidia-smi.pid"
    spec.write_text(
        json.dumps(
            {
                "rows": rows or [],
                "hang_seconds": hang_seconds,
                "exit_code": exit_code,
                "stderr": stderr,
                "stream_forever": stream_forever,
                "child_pid_file": str(child_pid_file) if child_pid_file else "",
                "apps": apps,
            }
        )
    )
    script = bin_dir / "nvidia-smi"
    script.write_text(SCRIPT.format(python=sys.executable, spec=str(spec), pid_file=str(pid_file)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return pid_file


def path_with(bin_dir: Path) -> str:
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
