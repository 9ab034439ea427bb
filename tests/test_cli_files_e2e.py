"""Code in, results out, end to end: `chiffon run` from a folder that is not on the
desktop's path, a real orchestrator and real agent processes on each engine and transport
pair the job suite covers; the job finds its files, what git ignores stays home, and what
`--out` names comes back byte for byte into ./chiffon-out/<job id>/, whatever the outcome."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.auth import TOKENS_ENV
from tests.fleet import Fleet, fleet_on, vhost_on, wait_for
from tests.procs import CHIFFON

ACCEPTS = {"CHIFFON_ACCEPT_JOBS": "true", "CHIFFON_ALLOW_ROOT_JOBS": "true",
           "CHIFFON_JOB_GRACE": "2"}  # fmt: skip
MAKE = """\
import hashlib, os, pathlib, sys
rows = pathlib.Path("data.csv").read_text().split()
print("rows", len(rows), "secret here:", os.path.exists("secret.log"))
pathlib.Path("results/plots").mkdir(parents=True, exist_ok=True)
pathlib.Path("results/sum.txt").write_text(str(sum(int(r) for r in rows)))
pathlib.Path("results/plots/p.bin").write_bytes(bytes(range(256)) * 40)
pathlib.Path("model.bin").write_bytes(hashlib.sha256(b"w").digest() * 1000)
pathlib.Path("not-asked-for.txt").write_text("stays on the desktop")
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture(scope="module", params=["sqlite-http", "postgresql-http", "postgresql-amqp"])
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    database, transport = request.param.split("-")
    tmp = tmp_path_factory.mktemp(f"files-{request.param}")
    with ExitStack() as stack:
        amqp_url = None
        if transport == "amqp":
            amqp_url = stack.enter_context(vhost_on(request.getfixturevalue("private_broker")))
        f = stack.enter_context(fleet_on(transport, tmp, amqp_url, sqlite=database == "sqlite"))
        f.start_agent("desk-2x24g", **ACCEPTS)
        online = lambda: f.agents().get("desk-2x24g", {}).get("status") == "online"  # noqa: E731
        wait_for("the agent online", online, f, 30)
        yield f


def project(root: Path) -> Path:
    root.mkdir()
    (root / "make.py").write_text(MAKE)
    (root / "data.csv").write_text("1\n2\n3\n4\n")
    (root / ".gitignore").write_text("*.log\nchiffon-out/\n")
    (root / "secret.log").write_text("never leaves this machine")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def run(fleet: Fleet, folder: Path, code: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHIFFON, "run", "--out", "results/**", "--out", "model.bin", "--",
         "python3", "make.py", str(code)],
        cwd=folder, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **TOKENS_ENV, "CHIFFON_ORCHESTRATOR_URL": fleet.api},
    )  # fmt: skip


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.mark.parametrize("code", [0, 3])
def test_a_script_from_a_folder_runs_and_its_outputs_come_back_whatever_its_end(
    fleet: Fleet, tmp_path: Path, code: int
) -> None:
    folder = project(tmp_path / "proj")
    done = run(fleet, folder, code)
    assert done.returncode == code, done.stderr + fleet.logs()
    assert done.stdout.splitlines()[-1] == "rows 4 secret here: False"
    assert "sending 3 files" in done.stderr and ".gitignore honoured" in done.stderr
    [job_dir] = (folder / "chiffon-out").iterdir()
    expected = {"model.bin": hashlib.sha256(hashlib.sha256(b"w").digest() * 1000).hexdigest(),
                "results/plots/p.bin": hashlib.sha256(bytes(range(256)) * 40).hexdigest(),
                "results/sum.txt": hashlib.sha256(b"10").hexdigest()}  # fmt: skip
    assert tree(job_dir) == expected
    assert f"3 output files, 42.2 kB, in chiffon-out/{job_dir.name}" in done.stderr
