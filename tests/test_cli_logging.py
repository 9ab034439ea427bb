"""One line a failure: what `chiffon up`, `chiffon orchestrator` and `chiffon agent` log
when something keeps failing (resource exhaustion printed 22 full tracebacks of the same
`RuntimeError: can't start new thread`)."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chiffon.cli.common import OncePerFailure, OneLineFormatter
from tests.procs import free_port, stop, wait_http

EXHAUSTED = "can't start new thread"


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO, list[float]]]:
    """A logger writing through `OncePerFailure` to a string, on a clock the test moves."""
    now = [0.0]
    handler = OncePerFailure(window_seconds=60, clock=lambda: now[0])
    out = io.StringIO()
    handler.setStream(out)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("chiffon.test_cli_logging")
    log.addHandler(handler)
    log.propagate, level = False, log.level
    log.setLevel(logging.INFO)
    try:
        yield log, out, now
    finally:
        log.removeHandler(handler)
        handler.close()
        log.propagate = True
        log.setLevel(level)


def _fail(log: logging.Logger) -> None:
    try:
        raise RuntimeError(EXHAUSTED)
    except RuntimeError:
        log.exception("collecting resources failed; skipping this beat")


def test_a_failure_that_repeats_is_one_line_then_its_count_never_a_traceback(
    logged: tuple[logging.Logger, io.StringIO, list[float]],
) -> None:
    log, out, now = logged
    for _ in range(22):
        _fail(log)
        now[0] += 1
    log.warning("the registry is slow")  # another failure: said at once
    log.info("still serving")
    failed = f"ERROR chiffon.test_cli_logging: collecting resources failed; skipping this beat: RuntimeError: {EXHAUSTED}"  # noqa: E501
    assert out.getvalue().splitlines() == [
        failed,
        "WARNING chiffon.test_cli_logging: the registry is slow",
        "INFO chiffon.test_cli_logging: still serving",
    ]
    now[0] = 70  # the window has passed: the next record says the count first
    log.info("later")
    assert out.getvalue().splitlines()[3:] == [
        f"{failed} (21 more times in 70 s)",
        "INFO chiffon.test_cli_logging: later",
    ]
    assert "Traceback" not in out.getvalue()


def test_threads_that_die_of_the_same_failure_are_counted_together(
    logged: tuple[logging.Logger, io.StringIO, list[float]],
) -> None:
    """Each dying thread has its own name: grouping by the rendered words made every one
    a new failure, never counted."""
    log, out, now = logged
    for n in range(5):
        try:
            raise RuntimeError(EXHAUSTED)
        except RuntimeError:
            log.exception("thread %s failed", f"worker-{n}")
        now[0] += 1
    log.handlers[0].close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("ERROR chiffon.test_cli_logging: thread worker-0 failed")
    assert lines[1].endswith("(4 more times in 5 s)")


def test_a_failure_that_goes_on_is_said_once_a_window_and_the_rest_at_exit(
    logged: tuple[logging.Logger, io.StringIO, list[float]],
) -> None:
    log, out, now = logged
    for second in range(150):
        now[0] = second
        _fail(log)
    log.handlers[0].close()  # at exit (logging.shutdown)
    lines = out.getvalue().splitlines()
    assert [line.rpartition(EXHAUSTED)[2] for line in lines] == [
        "",
        " (60 more times in 60 s)",
        " (60 more times in 60 s)",
        " (29 more times in 29 s)",
    ]


# A real `chiffon up` whose threads run out while a flag file exists: every new thread
# fails as under resource exhaustion, and so does GET /api/v1/agents (uvicorn's error
# log) with a callback (asyncio's exception handler).
EXHAUST = f"""
import asyncio, os, sys, threading
flag = sys.argv.pop(1)
start = threading.Thread.start

def exhausted(self):
    if os.path.exists(flag):
        raise RuntimeError("{EXHAUSTED}")
    return start(self)

threading.Thread.start = exhausted

from chiffon.persistence import registry
list_agents = registry.list_agents

def boom():
    raise RuntimeError("{EXHAUSTED}")

async def failing(*args, **kwargs):
    if os.path.exists(flag):
        asyncio.get_running_loop().call_soon(boom)
        raise RuntimeError("{EXHAUSTED}")
    return await list_agents(*args, **kwargs)

registry.list_agents = failing

from chiffon.cli.main import main
main()
"""


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_up_out_of_threads_keeps_serving_and_logs_one_line_a_failure(
    tmp_path: Path, debug: bool
) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "CHIFFON_HEARTBEAT_INTERVAL": "0.2"}
    for var in ("CHIFFON_DATA_DIR", "CHIFFON_API_TOKEN", "CHIFFON_ENROLL_TOKEN"):
        env.pop(var, None)
    flag, port, log = tmp_path / "exhausted", free_port(), tmp_path / "up.log"
    args = [sys.executable, "-c", EXHAUST, str(flag), *(["--debug"] if debug else [])]
    with log.open("w") as out:
        proc = subprocess.Popen([*args, "up", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            api = f"http://127.0.0.1:{port}"
            wait_http(f"{api}/healthz", proc, log=log)
            token = (tmp_path / ".chiffon" / "api_token").read_text().strip()
            headers = {"authorization": f"Bearer {token}"}
            flag.touch()
            answers = []
            for _ in range(4):
                answers.append(httpx.get(f"{api}/api/v1/agents", headers=headers).status_code)
                answers.append(httpx.get(f"{api}/healthz").status_code)
                time.sleep(0.5)
            assert answers == [500, 200] * 4  # it keeps answering
            flag.unlink()
            assert httpx.get(f"{api}/api/v1/agents", headers=headers).status_code == 200
            assert stop(proc, signal.SIGINT) == 0
        finally:
            stop(proc, signal.SIGKILL)
    text = log.read_text()
    failures = {
        "chiffon.agent.loop": "collecting resources failed; skipping this beat",
        "uvicorn.error": "Exception in ASGI application",
        "asyncio": "Exception in callback boom()",
    }
    for logger, message in failures.items():
        said = [line for line in text.splitlines() if f" {logger}: {message}" in line]
        if debug:  # each one, with its traceback
            assert len(said) >= (2 if logger == "chiffon.agent.loop" else 4), text
            continue
        counted = rf"RuntimeError: {EXHAUSTED} \((\d+) more times? in \d+ s\)$"
        assert len(said) == 2, text
        assert said[0].endswith(f": RuntimeError: {EXHAUSTED}"), said
        found = re.search(counted, said[1])
        assert found is not None, said
        assert int(found[1]) >= (1 if logger == "chiffon.agent.loop" else 3), said
    assert ("Traceback" in text) is debug
