"""The agent's attempt-state table (agent.attempts): every allowed move is taken, every other
one refused; what an agent holds follows the states; and a reading only reads."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from chiffon.agent.attempts import HELD, MOVES, AttemptState, AttemptTable, IllegalMove
from chiffon.agent.hooks import HOOKS, AttemptHook
from chiffon.agent.reading import Jobs, read
from chiffon.agent.report import GpuReading, Snapshot


def test_every_move_of_the_table_is_allowed_and_every_other_refused(tmp_path: Path) -> None:
    for start, to in itertools.product(MOVES, MOVES):
        table = AttemptTable()
        attempt = table.add((uuid.uuid4(), 1), tmp_path)
        attempt.state = start
        if to in MOVES[start]:
            table.move(attempt, to)
            assert attempt.state == to
            assert (attempt.ended_at is not None) == (to == "ended")
        else:
            with pytest.raises(IllegalMove):
                table.move(attempt, to)
            assert attempt.state == start


def test_an_attempt_is_held_from_its_start_until_its_end_is_heard(tmp_path: Path) -> None:
    table = AttemptTable()
    attempt = table.add((uuid.uuid4(), 1), tmp_path)
    held = []
    states: tuple[AttemptState, ...] = ("starting", "running", "ended", "reported")
    for state in states:
        table.move(attempt, state)
        held.append(table.held() == [attempt.key])
    assert held == [True, True, True, False]
    assert frozenset({"starting", "running", "ended"}) == HELD


def test_every_hook_is_an_attempt_hook_and_each_point_is_optional() -> None:
    assert HOOKS and all(issubclass(hook, AttemptHook) for hook in HOOKS)
    names = [hook.__name__ for hook in HOOKS]
    assert len(set(names)) == len(names)


def test_a_reading_of_an_ended_jobs_leftover_ends_nothing() -> None:
    """The leftover is found and named; it is the work loop that ends it, not the reading."""
    key = (uuid.uuid4(), 1)
    env = {**os.environ, "CHIFFON_JOB_ID": str(key[0]), "CHIFFON_ATTEMPT": "1"}
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        gpu = GpuReading(index=0, uuid="GPU-0", vendor="nvidia", vram_total_gb=24.0,
                         vram_free_gb=20.0, processes=((leftover.pid, 4.0),))  # fmt: skip
        snapshot = Snapshot(gpus=[gpu], gpu_count=1, gpu_type="nvidia", gpu_vram_total_gb=24.0,
                            gpu_vram_available_gb=20.0,
                            gpu_vram_available_max_gb=20.0)  # fmt: skip
        reading = read(snapshot, Jobs(ended={key}, dirt={"GPU-0": 0.0}))
        assert reading.leftovers == [(leftover.pid, "GPU-0", key)]
        assert [seen.dirty for seen in reading.seen] == [True] and reading.clean == []
        assert leftover.poll() is None  # still running: a reading only reads
    finally:
        leftover.kill()
        leftover.wait()
