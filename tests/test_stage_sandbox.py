"""A job's files inside the sandbox: the snapshot laid into its folder is its own to change
(as the job user, when the agent runs as root), its checkpoint folder is there and
writable at `CHIFFON_CHECKPOINT_DIR`, the save marker reaches the agent, and the blob cache
stays out of its sight."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from chiffon.agent.runner import Assignment, JobRun
from chiffon.agent.sandbox import Sandbox, SandboxConfig
from chiffon.agent.stage import lay_out
from chiffon.schemas.files import Entry, Manifest
from tests.test_sandbox import data_dir, pytestmark  # noqa: F401 (the fixture, the skip)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_a_sandboxed_job_changes_its_copy_writes_its_checkpoint_and_sees_no_cache(
    data_dir: Path,  # noqa: F811 (the fixture)
) -> None:
    cache = data_dir / "cache"
    code = b"print('v1')\n"
    (cache / "blobs").mkdir(parents=True)
    (cache / "blobs" / sha(code)).write_bytes(code)
    sandbox = Sandbox(SandboxConfig(hide=[data_dir]))
    sandbox.start()
    attempt_dir = data_dir / "jobs" / "f-1"
    attempt_dir.mkdir(parents=True)
    lay_out(Manifest.of([Entry("src/a.py", sha(code), len(code))]),
            lambda s: cache / "blobs" / s, attempt_dir / "work")  # fmt: skip
    script = (
        'echo v2 > src/a.py && echo 7 > "$CHIFFON_CHECKPOINT_DIR/step" && '
        'touch "$CHIFFON_CHECKPOINT_SAVE" && '
        f"if ls {cache}/blobs 2>/dev/null | grep -q .; then echo SEEN; fi; "
        'echo "cp=$CHIFFON_CHECKPOINT_DIR"'
    )
    run = JobRun(
        Assignment(job_id="f", attempt=1, command=["sh", "-c", script]),
        attempt_dir=attempt_dir, grace_seconds=2.0, unit=sandbox.unit("f-1", memory_gb=0),
    )  # fmt: skip
    await run.start()
    ended = await asyncio.wait_for(run.wait(), 60)
    out = run.log_path.read_text()
    assert ended.exit_code == 0, out
    assert (attempt_dir / "work" / "src" / "a.py").read_text() == "v2\n"
    assert (cache / "blobs" / sha(code)).read_bytes() == code  # the cache untouched
    assert (attempt_dir / "checkpoint" / "step").read_text() == "7\n"
    assert (attempt_dir / "checkpoint" / ".chiffon-save").exists()
    assert "SEEN" not in out and "cp=/tmp/chiffon-checkpoint" in out
