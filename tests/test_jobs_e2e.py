"""Jobs end to end: a real orchestrator process, real agent processes that accept jobs
(over HTTP), real commands, and the `chiffon run`, `jobs` and `logs` commands a user
types; on SQLite and on PostgreSQL. GPUs come from a fake nvidia-smi (the one boundary
that cannot exist here)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import aio_pika
import psutil
import pytest

from chiffon.client import Client
from chiffon.transport.auth import SIGNATURE_HEADER
from chiffon.transport.orders import Order, encode, order_key
from chiffon.transport.rabbitmq.orders import orders_key
from tests.auth import API_TOKEN, TOKENS_ENV
from tests.fleet import Fleet, fleet_on, vhost_on, wait_for
from tests.private_services import PrivateRabbit
from tests.procs import CHIFFON, alive, run_cli, stop

ACCEPTS = {"CHIFFON_ACCEPT_JOBS": "true", "CHIFFON_ALLOW_ROOT_JOBS": "true",
           "CHIFFON_JOB_GRACE": "2"}  # fmt: skip
GPU0 = "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd"  # desk-2x24g's GPU 0 (20000 MiB free)
EMPTY = tempfile.mkdtemp(prefix="chiffon-e2e-")  # where a user runs `chiffon run`: nothing sent
PRINT_ENV = "import json, os, sys; print(json.dumps(dict(os.environ))); sys.exit(3)"


@pytest.fixture(scope="module", params=["sqlite-http", "postgresql-http", "postgresql-amqp"])
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """desk-2x24g accepts jobs; desk-8g does not (its owner did not opt in). Over RabbitMQ
    on the test run's private broker (a test restarts it)."""
    database, transport = request.param.split("-")
    tmp = tmp_path_factory.mktemp(f"jobs-{request.param}")
    with ExitStack() as stack:
        amqp_url = None
        if transport == "amqp":
            broker = request.getfixturevalue("private_broker")
            amqp_url = stack.enter_context(vhost_on(broker))
        f = stack.enter_context(fleet_on(transport, tmp, amqp_url, sqlite=database == "sqlite"))
        f.start_agent("desk-2x24g", **ACCEPTS)
        f.start_agent("desk-8g")
        wait_for("both agents online", lambda: _online(f) == {"desk-2x24g", "desk-8g"}, f, 30)
        yield f


def _online(f: Fleet) -> set[str]:
    return {n for n, a in f.agents().items() if a["status"] == "online"}


def chiffon(f: Fleet, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"CHIFFON_ORCHESTRATOR_URL": f.api}, timeout=timeout)


def client(f: Fleet) -> Client:
    return Client(f.api, token=API_TOKEN)


def test_run_streams_the_output_and_exits_with_the_jobs_own_code(fleet: Fleet) -> None:
    done = chiffon(fleet, "run", "--gpus", "1", "--vram", "16", "--", sys.executable, "-c",
                   PRINT_ENV)  # fmt: skip
    assert done.returncode == 3, done.stderr + fleet.logs()
    env = json.loads(done.stdout)
    job_id = env["CHIFFON_JOB_ID"]
    assert f"job {job_id} queued" in done.stderr
    # The only desktop that accepts jobs ("ran on" when it was over at the first look).
    assert re.search("(running|ran) on desk-2x24g", done.stderr), done.stderr
    # It sees only its GPU (the best fit: the one with less free VRAM that still fits).
    assert env["CUDA_VISIBLE_DEVICES"] == env["NVIDIA_VISIBLE_DEVICES"] == GPU0
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CHIFFON_ATTEMPT"] == "1"
    # Nothing of the agent's own environment leaks in: not its enrollment token.
    assert not {k for k in env if k.startswith("CHIFFON_")} - {
        "CHIFFON_JOB_ID", "CHIFFON_ATTEMPT", "CHIFFON_JOB_DIR", "CHIFFON_GPUS",
        "CHIFFON_PREEMPT_SIGNAL", "CHIFFON_PREEMPT_DEADLINE", "CHIFFON_CHECKPOINT_DIR",
        "CHIFFON_CHECKPOINT_SAVE",
    }  # fmt: skip
    assert "job " in done.stderr and "failed: exited 3" in done.stderr
    with client(fleet) as c:
        job = c.get(job_id)
    assert (job.state, job.exit_code, job.agent_name) == ("failed", 3, "desk-2x24g")
    assert job.attempts[0].gpu_uuids == [GPU0]


def test_detach_then_logs_and_jobs_show_what_it_wrote(fleet: Fleet) -> None:
    script = "for i in range(40000): print(f'line {i}')"
    detached = chiffon(fleet, "run", "--detach", "--name", "many-lines", "--", sys.executable,
                       "-c", script)  # fmt: skip
    assert detached.returncode == 0, detached.stderr
    job_id = detached.stdout.strip()
    with client(fleet) as c:
        assert c.wait(job_id, timeout_seconds=60).state == "succeeded"
    logs = chiffon(fleet, "logs", job_id[:8])
    assert logs.stdout == "".join(f"line {i}\n" for i in range(40000)), logs.stderr
    listed = chiffon(fleet, "jobs", "--state", "succeeded")
    assert "many-lines" in listed.stdout and job_id[:8] in listed.stdout
    shown = chiffon(fleet, "jobs", "show", job_id)
    assert "desk-2x24g" in shown.stdout and "exited 0" in shown.stdout


def test_ctrl_c_cancels_the_job_and_says_so(fleet: Fleet) -> None:
    proc = subprocess.Popen(
        [*CHIFFON, "run", "--", "sleep", "300"],
        env={**os.environ, "CHIFFON_API_TOKEN": API_TOKEN, "CHIFFON_ORCHESTRATOR_URL": fleet.api},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=EMPTY,
    )  # fmt: skip
    try:
        with client(fleet) as c:
            wait_for("the sleep to run", lambda: _running(c, "sleep"), fleet, 30)
            [job] = [j for j in c.jobs(state="running") if j.command == ["sleep", "300"]]
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 130, err
            assert "Ctrl-C: cancelling job" in err
            ended = c.get(job.job_id)
        assert ended.state == "cancelled", ended
        assert not _processes_of(str(job.job_id))  # its sleep was ended, not left behind
    finally:
        stop(proc)


def _processes_of(job_id: str) -> list[psutil.Process]:
    """The processes this job's attempts started (the agent names the job in their
    environment): another test's `sleep 300` on this machine is not this job's."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("CHIFFON_JOB_ID") == job_id and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def _running(c: Client, program: str) -> bool:
    return any(j.command[0] == program for j in c.jobs(state="running"))


def test_a_job_no_desktop_could_hold_waits_and_says_why(fleet: Fleet) -> None:
    done = chiffon(fleet, "run", "--detach", "--gpus", "1", "--vram", "100", "--", "true")
    assert done.returncode == 0
    assert "warning: no registered agent could ever hold" in done.stderr
    job_id = done.stdout.strip()
    with client(fleet) as c:
        wait_for("a reason", lambda: bool(c.get(job_id).reason), fleet, 10)
        job = c.get(job_id)
        assert job.state == "queued"
        assert "closest is desk-2x24g GPU 1 with" in job.reason
        assert "1 does not accept jobs" in job.reason  # desk-8g
        assert c.cancel(job_id).state == "cancelled"


def test_bad_input_is_one_line_and_exit_2(fleet: Fleet) -> None:
    for args, says in [
        (["run", "--timeout", "soon", "--", "true"], "--timeout wants a duration"),
        (["run", "--env", "1BAD=x", "--", "true"], "is not a variable name"),
        (["jobs", "--state", "sleeping"], "--state must be one of"),
        (["jobs", "show", str(uuid.uuid4())], "no job"),
        (["run", "--workdir", "proj", "--", "true"], "must be an absolute path on the desktop"),
    ]:
        done = chiffon(fleet, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_job_that_cannot_start_fails_saying_why_and_where_without_a_made_up_code(
    fleet: Fleet,
) -> None:
    done = chiffon(fleet, "run", "--workdir", "/nonexistent/dir", "--", "true")
    assert done.returncode == 1, done.stderr + fleet.logs()
    assert "the folder /nonexistent/dir does not exist on desk-2x24g" in done.stderr
    # The job id is random hex and may hold the digits "127" (CI drew one that did).
    assert not re.search(r"\b127\b", done.stderr) and "Errno" not in done.stderr
    with client(fleet) as c:
        job_id = c.submit(["no-such-program-x", "--epochs", "3"]).job.job_id
        job = c.wait(job_id, timeout_seconds=30)
    assert (job.state, job.exit_code) == ("failed", None)
    assert job.reason == "the program 'no-such-program-x' was not found on desk-2x24g"
    assert job.attempts[0].started_at is None and job.started_at is None


def test_a_job_shows_where_its_whole_log_is_on_the_desktop(fleet: Fleet) -> None:
    with client(fleet) as c:
        job_id = c.submit(["sh", "-c", "echo all of it"], env={"TOKEN": "s3cret"},
                          timeout_seconds=60).job.job_id  # fmt: skip
        job = c.wait(job_id, timeout_seconds=30)
    assert job.state == "succeeded" and job.started_at is not None
    assert (job.env_names, job.timeout_seconds, job.workdir) == (["TOKEN"], 60, None)
    [attempt] = job.attempts
    jobs_dir = fleet.tmp / "desk-2x24g" / "state" / "jobs"
    assert attempt.log_path == str((jobs_dir / f"{job_id}-1" / "output.log").absolute())
    assert Path(attempt.log_path).read_text() == "all of it\n"
    assert attempt.log_bytes_cut == 0


def test_a_killed_agent_finds_its_job_ends_it_and_the_job_runs_again(fleet: Fleet) -> None:
    with client(fleet) as c:
        job_id = c.submit(["sleep", "300"], retries=1).job.job_id
        wait_for("the job to run", lambda: c.get(job_id).state == "running", fleet, 30)
        state = fleet.tmp / "desk-2x24g" / "state" / "jobs" / f"{job_id}-1" / "state.json"
        pid = json.loads(state.read_text())["pid"]
        fleet.procs["desk-2x24g"].kill()  # SIGKILL: its jobs' launchers die with it
        fleet.procs["desk-2x24g"].wait(10)
        wait_for("the job to end with its agent", lambda: _gone(pid), fleet, 10)
        fleet.start_agent("desk-2x24g", **ACCEPTS)
        wait_for("attempt 2 to run", lambda: _attempt_running(c, job_id, 2), fleet, 60)
        first = c.get(job_id).attempts[0]
        assert first.state == "lost", first
        c.cancel(job_id)
        wait_for("the cancel", lambda: c.get(job_id).state == "cancelled", fleet, 30)


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def _attempt_running(c: Client, job_id: uuid.UUID, attempt: int) -> bool:
    job = c.get(job_id)
    return job.attempt == attempt and job.state == "running"


def test_an_orchestrator_restart_loses_nothing(fleet: Fleet) -> None:
    with client(fleet) as c:
        job_id = c.submit(["sh", "-c", "echo before; sleep 4; echo after"]).job.job_id
        wait_for("the job to run", lambda: c.get(job_id).state == "running", fleet, 30)
        assert fleet.orchestrator is not None
        stop(fleet.orchestrator)
        time.sleep(1)
        fleet.start_orchestrator()
        job = c.wait(job_id, timeout_seconds=60)
        assert (job.state, job.attempt) == ("succeeded", 1), (job, fleet.events("desk-2x24g"))
        assert "".join(p.data for p in c.logs(job_id)) == "before\nafter\n"


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_a_job_that_ends_while_the_orchestrator_is_away_keeps_its_outcome(fleet: Fleet) -> None:
    """Issue 34, item 5: the orchestrator is stopped for 30 s while the job ends (the
    agent gave up after 7 tries in 22 s and the job stayed `running` for ever). The
    agent saves the end and says it until heard: the job succeeds, on its first attempt."""
    with client(fleet) as c:
        job_id = c.submit(["sh", "-c", "sleep 2; echo done"]).job.job_id
        wait_for("the job to run", lambda: c.get(job_id).state == "running", fleet, 30)
        assert fleet.orchestrator is not None
        stop(fleet.orchestrator)
        attempt_dir = fleet.tmp / "desk-2x24g" / "state" / "jobs" / f"{job_id}-1"
        time.sleep(30)
        saved = json.loads((attempt_dir / "ended.json").read_text())
        assert (saved["outcome"], saved["exit_code"]) == ("exit", 0)
        assert not (attempt_dir / "reported").exists()
        fleet.start_orchestrator()
        job = c.wait(job_id, timeout_seconds=60)
        assert (job.state, job.attempt) == ("succeeded", 1), (job, fleet.logs())
        wait_for("the end marked heard", (attempt_dir / "reported").exists, fleet, 10)


def test_the_api_refuses_jobs_without_the_token(fleet: Fleet) -> None:
    done = run_cli("run", "--", "true", env={"CHIFFON_ORCHESTRATOR_URL": fleet.api,
                                              "CHIFFON_API_TOKEN": "wrong"})  # fmt: skip
    assert done.returncode == 1 and "HTTP 401" in done.stderr
    assert TOKENS_ENV["CHIFFON_API_TOKEN"] not in done.stderr


@pytest.mark.parametrize("fleet", ["postgresql-amqp"], indirect=True)
def test_over_rabbitmq_orders_are_pushed_and_survive_a_broker_restart(
    fleet: Fleet, request: pytest.FixtureRequest
) -> None:
    broker: PrivateRabbit = request.getfixturevalue("private_broker")
    with client(fleet) as c:
        # Pushed: the agent's own HTTP ask comes only every 30 s.
        first = c.submit(["true"]).job.job_id
        assert c.wait(first, timeout_seconds=10).state == "succeeded"
        running = c.submit(["sh", "-c", "sleep 3; echo survived"]).job.job_id
        wait_for("the job to run", lambda: c.get(running).state == "running", fleet, 30)
        with broker.stopped():
            time.sleep(1)
        job = c.wait(running, timeout_seconds=60)
        assert job.state == "succeeded" and "".join(p.data for p in c.logs(running)) == "survived\n"
        queue = f"chiffon.orders.{fleet.agent_id('desk-2x24g')}"
        vhost = fleet.agent_env["CHIFFON_AMQP_URL"].rsplit("/", 1)[1]
        wait_for(
            "the agent's queue again",
            lambda: queue in broker.ctl("list_queues", "-p", vhost, "name"),
            fleet,
            30,
        )
        after = c.submit(["true"]).job.job_id
        assert c.wait(after, timeout_seconds=10).state == "succeeded"


@pytest.mark.parametrize("fleet", ["postgresql-amqp"], indirect=True)
def test_an_order_forged_by_someone_on_the_broker_runs_nothing(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Whoever can publish to the broker (guest/guest on a LAN) targets the agent's queue
    with an assignment signed with a wrong key: nothing runs, and the agent says why."""
    agent = uuid.UUID(fleet.agent_id("desk-2x24g"))
    marker = tmp_path / "pwned"
    forged = Order("assign", agent, uuid.uuid4(), 1, time.time(),
                   {"command": ["touch", str(marker)], "gpu_uuids": []})  # fmt: skip
    body, signature = encode(forged, order_key("not-the-agents-secret"))
    asyncio.run(_publish(fleet.agent_env["CHIFFON_AMQP_URL"], agent, body, signature))
    log = fleet.tmp / "desk-2x24g.log"
    wait_for("the refusal", lambda: "order refused: bad_signature" in log.read_text(), fleet, 10)
    assert not marker.exists()
    assert not (fleet.tmp / "desk-2x24g" / "state" / "jobs" / f"{forged.job_id}-1").exists()


@pytest.mark.parametrize("fleet", ["postgresql-amqp"], indirect=True)
def test_a_broker_user_reads_no_order_and_cannot_take_the_agents_queue(fleet: Fleet) -> None:
    """Issue 34, item 1, on the real broker with the shared credential: a queue bound to
    `orders.#` receives copies of every order, sealed (no command, no environment); the
    agent's queue has a name no one can guess, so declaring the guessable one first
    (exclusive, as a squatter did) takes nothing from the agent, whose jobs are still
    pushed to it at once."""
    url, agent = fleet.agent_env["CHIFFON_AMQP_URL"], fleet.agent_id("desk-2x24g")

    async def eavesdrop() -> tuple[list[bytes], float, str]:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            squat = await channel.declare_queue(f"chiffon.orders.{agent}", exclusive=True)
            spy = await channel.declare_queue(exclusive=True)
            await spy.bind("chiffon", "orders.#")
            await squat.bind("chiffon", f"orders.{agent}")
            with client(fleet) as c:
                started = time.monotonic()
                job_id = await asyncio.to_thread(
                    c.submit, ["sh", "-c", "echo $S3_SECRET_KEY"],
                    env={"S3_SECRET_KEY": "hunter2-s3cr3t"},
                )  # fmt: skip
                job = await asyncio.to_thread(c.wait, job_id.job.job_id, timeout_seconds=10)
                took = time.monotonic() - started
            copies = []
            while (message := await spy.get(fail=False, no_ack=True)) is not None:
                copies.append(message.body)
            return copies, took, job.state

    copies, took, state = asyncio.run(eavesdrop())
    assert state == "succeeded" and took < 5, (state, took)
    assert copies, "the spy's queue received no copy: nothing was tested"
    for body in copies:
        assert body.startswith(b"c1.")
        assert b"hunter2" not in body and b"S3_SECRET_KEY" not in body and b"echo" not in body


async def _publish(url: str, agent: uuid.UUID, body: bytes, signature: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("chiffon")
        message = aio_pika.Message(body, headers={SIGNATURE_HEADER: signature})
        await exchange.publish(message, orders_key(agent))


def test_a_desktop_back_from_a_partition_ends_the_attempt_that_was_placed_again(
    fleet: Fleet,
) -> None:
    """The agent is frozen (SIGSTOP) long enough to be judged offline: its attempt is lost
    and the job placed again (here on the same desktop, once back). The attempt it kept
    running is ended at its next check, so the job never runs twice at once for long."""
    agent = fleet.procs["desk-2x24g"]
    with client(fleet) as c:
        job_id = c.submit(["sleep", "300"], retries=1).job.job_id
        wait_for("the job to run", lambda: c.get(job_id).state == "running", fleet, 30)
        state = fleet.tmp / "desk-2x24g" / "state" / "jobs" / f"{job_id}-1" / "state.json"
        first = json.loads(state.read_text())["pid"]
        agent.send_signal(signal.SIGSTOP)
        try:
            wait_for("the attempt lost", lambda: c.get(job_id).state == "queued", fleet, 30)
        finally:
            agent.send_signal(signal.SIGCONT)
        wait_for("attempt 2 to run", lambda: _attempt_running(c, job_id, 2), fleet, 30)
        wait_for("attempt 1 ended", lambda: not alive(first), fleet, 30)
        events = [e.reason for e in c.get(job_id).events]
        assert any("lost: its desktop went offline; retrying" in e for e in events), events
        c.cancel(job_id)
        wait_for("the cancel", lambda: c.get(job_id).state == "cancelled", fleet, 30)


def test_a_silent_job_past_its_timeout_exits_124_and_says_where_it_ran(fleet: Fleet) -> None:
    done = chiffon(fleet, "run", "--timeout", "1s", "--", "sleep", "30")
    assert done.returncode == 124, done.stderr
    assert "running on desk-2x24g" in done.stderr  # said when placed, not at first output
    assert "timed_out: ran past its timeout of 1 s" in done.stderr
    assert "timed_out: timed_out" not in done.stderr


# 100,000 numbered lines as fast as Python writes them: 5.3 MB, more than the tail the
# orchestrator keeps (1 MiB) and than the agent lets its shipping fall behind (4 MiB).
LINE_BYTES = len(f"line {0:06d} {'x' * 40}\n")
NUMBERED = "import sys\nfor i in range(100_000):\n    sys.stdout.write(f'line {i:06d} ' + 'x' * 40 + '\\n')"  # noqa: E501


def test_run_prints_every_line_in_order_or_says_how_many_bytes_it_skipped(fleet: Fleet) -> None:
    """`chiffon run` showed 84,085 to 94,749 of 100,001 lines, began mid-line and spliced
    lines, and said nothing. Now every line it prints is whole and in order, and every
    byte it does not print is counted on stderr, with where the whole log is."""
    done = chiffon(fleet, "run", "--", sys.executable, "-c", NUMBERED, timeout=240)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines.pop() == "", "the output ends with the job's last newline"
    numbers = []
    for line in lines:
        assert re.fullmatch(r"line \d{6} x{40}", line), f"a spliced or cut line: {line!r}"
        numbers.append(int(line[5:11]))
    assert numbers == sorted(set(numbers)), "in order, none twice"
    said = re.findall(r"chiffon: ([\d,]+) bytes of output skipped", done.stderr)
    skipped = sum(int(n.replace(",", "")) for n in said)
    assert skipped == (100_000 - len(numbers)) * LINE_BYTES, done.stderr
    if skipped:
        job = re.search(r"job (\S+) queued", done.stderr)
        assert job is not None
        path = fleet.tmp / "desk-2x24g" / "state" / "jobs" / f"{job[1]}-1" / "output.log"
        assert f"the whole log is on desk-2x24g at {path}" in done.stderr, done.stderr
    # `chiffon logs` afterwards: the kept tail, from a whole line, with the same notice.
    job_id = re.search(r"job (\S+) queued", done.stderr)
    assert job_id is not None
    logs = chiffon(fleet, "logs", job_id[1])
    kept = logs.stdout.split("\n")[:-1]
    assert kept and kept[-1].startswith("line 099999 ")
    assert all(re.fullmatch(r"line \d{6} x{40}", line) for line in kept), "whole lines only"
    cut = 100_000 - len(kept)
    assert f"chiffon: {cut * LINE_BYTES:,} bytes of output skipped" in logs.stderr


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_run_cancels_its_job_and_goes_on_from_where_it_was(
    fleet: Fleet, sig: signal.Signals
) -> None:
    """Ctrl-C replayed the whole output; SIGTERM and SIGHUP (a closed terminal) left the
    job running for ever. Each now cancels it, as srun does, and says so."""
    # On SIGTERM (the cancel) the job prints three more steps: after Ctrl-C, `run` shows
    # them, following on from where it was, each once.
    script = ("trap 'for i in 4 5 6; do echo step $i; done; exit 0' TERM; "
              "for i in 1 2 3; do echo step $i; done; sleep 300 & wait")  # fmt: skip
    proc = subprocess.Popen(
        [*CHIFFON, "run", "--name", f"steps-{sig.name}", "--", "sh", "-c", script],
        env={**os.environ, "CHIFFON_API_TOKEN": API_TOKEN, "CHIFFON_ORCHESTRATOR_URL": fleet.api},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=EMPTY,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = [proc.stdout.readline() for _ in range(3)]
        assert seen == ["step 1\n", "step 2\n", "step 3\n"]
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=30)
        # Ctrl-C: on from where it was, nothing twice; SIGTERM, SIGHUP: gone at once.
        assert rest == ("step 4\nstep 5\nstep 6\n" if sig == signal.SIGINT else ""), err
        said = "Ctrl-C" if sig == signal.SIGINT else sig.name
        assert f"{said}: cancelling job" in err, err
        assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), err
        with client(fleet) as c:
            [job] = [j for j in c.jobs() if j.name == f"steps-{sig.name}"]
            wait_for("the cancel", lambda: c.get(job.job_id).state == "cancelled", fleet, 30)
        assert not _processes_of(str(job.job_id))
    finally:
        stop(proc)


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_the_python_client_cancels_its_job_when_its_program_is_killed(fleet: Fleet) -> None:
    """A Python program blocked in `Client.run()` and sent SIGTERM left its job queued
    for ever (here it could never be placed: 8 GPUs)."""
    program = (
        "import sys\nfrom chiffon.client import Client\n"
        "with Client(sys.argv[1]) as c:\n"
        "    c.run(['true'], gpus=8, name='killed-client', on_reason=lambda j: print(j.reason, flush=True))\n"  # noqa: E501
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", program, fleet.api],
        env={**os.environ, "CHIFFON_API_TOKEN": API_TOKEN},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=EMPTY,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        reason = proc.stdout.readline()  # why it waits, through the callback
        assert "8 GPUs" in reason or "GPU" in reason, reason
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode != 0
        assert "cancelling job" in err and "no registered agent could ever hold" in err, err
        with client(fleet) as c:
            [job] = [j for j in c.jobs() if j.name == "killed-client"]
            assert job.state == "cancelled"
    finally:
        stop(proc)


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_client_run_says_why_and_gives_up_when_asked_to(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's snippet on a machine without room blocked for ever, silently."""
    reasons: list[str] = []
    with client(fleet) as c, pytest.raises(TimeoutError, match=r"is still queued: .+"):
        c.run(["true"], gpus=1, vram_gb=100, wait_seconds=3, name="never-fits",
              on_reason=lambda j: reasons.append(j.reason))  # fmt: skip
    assert "no registered agent could ever hold" in caplog.text
    assert reasons and "closest is desk-2x24g" in reasons[0]
    with client(fleet) as c:
        [job] = [j for j in c.jobs() if j.name == "never-fits"]
        assert job.state == "cancelled", "given up on: cancelled, not left queued"


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_logs_on_a_terminal_obey_no_control_sequence_but_a_pipe_gets_every_byte(
    fleet: Fleet,
) -> None:
    hostile = "printf '\\033[32mok\\033[0m \\033]52;c;cHduZWQ=\\007\\033]0;t\\007\\033[2J end\\n'"
    with client(fleet) as c:
        job_id = c.submit(["sh", "-c", hostile]).job.job_id
        assert c.wait(job_id, timeout_seconds=30).state == "succeeded"
    raw = "\x1b[32mok\x1b[0m \x1b]52;c;cHduZWQ=\x07\x1b]0;t\x07\x1b[2J end\n"
    assert chiffon(fleet, "logs", str(job_id)).stdout == raw  # piped: byte-exact
    on_tty = _on_a_terminal(fleet, "logs", str(job_id))
    assert "\x1b[32mok\x1b[0m" in on_tty and "\\x1b]52;c;cHduZWQ=\\x07" in on_tty
    assert "\x07" not in on_tty and "\x1b]" not in on_tty and "\x1b[2J" not in on_tty
    assert raw.replace("\n", "\r\n") in _on_a_terminal(fleet, "logs", "--raw", str(job_id))


def _on_a_terminal(fleet: Fleet, *args: str) -> str:
    """What a command writes when its stdout is a terminal (a pseudo-terminal here)."""
    import pty

    main, side = pty.openpty()
    proc = subprocess.Popen(
        [*CHIFFON, *args],
        env={**os.environ, "CHIFFON_API_TOKEN": API_TOKEN, "CHIFFON_ORCHESTRATOR_URL": fleet.api},
        stdout=side, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(side)
    out = b""
    try:
        while chunk := _read_pty(main):
            out += chunk
    finally:
        proc.wait(30)
        os.close(main)
    return out.decode()


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other side closed
        return b""


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_jobs_and_jobs_show_say_what_a_user_needs(fleet: Fleet, job_visible_dir: Path) -> None:
    # (the desktop's /tmp itself is refused as a workdir: each job has its own)
    workdir = str(job_visible_dir)
    done = chiffon(fleet, "run", "--name", "quoted", "--workdir", workdir, "--timeout", "1h",
                   "--env", "SECRET_TOKEN=hunter2", "--",
                   "sh", "-c", "echo hello from $CHIFFON_JOB_ID; exit 3")  # fmt: skip
    assert done.returncode == 3
    assert re.search("(running|ran) on desk-2x24g", done.stderr), done.stderr
    assert "attempt 1" not in done.stderr, "a first attempt is not announced as a retry"
    job_id = re.search(r"job (\S+) queued", done.stderr)
    assert job_id is not None
    shown = chiffon(fleet, "jobs", "show", job_id[1]).stdout
    assert "sh -c 'echo hello from $CHIFFON_JOB_ID; exit 3'" in shown
    assert workdir in shown and "3600s" in shown and "SECRET_TOKEN" in shown
    assert "hunter2" not in shown
    log = fleet.tmp / "desk-2x24g" / "state" / "jobs" / f"{job_id[1]}-1" / "output.log"
    assert f"whole log at {log}" in shown
    table = chiffon(fleet, "jobs", "--limit", "5").stdout
    assert "AGE" in table and "RUNTIME" in table


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_logs_of_a_queued_job_say_it_is_queued_and_why(fleet: Fleet) -> None:
    with client(fleet) as c:
        job_id = c.submit(["true"], gpus=4, name="queued-logs").job.job_id
        try:
            wait_for("a reason", lambda: bool(c.get(job_id).reason), fleet, 10)
            done = chiffon(fleet, "logs", str(job_id))
            assert done.returncode == 0 and done.stdout == ""
            assert f"job {job_id} is queued: " in done.stderr
            assert c.get(job_id).reason in done.stderr
        finally:
            c.cancel(job_id)


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_a_relative_workdir_is_refused_in_words(fleet: Fleet) -> None:
    done = chiffon(fleet, "run", "--workdir", "proj", "--", "true")
    assert done.returncode == 2
    said = done.stderr.strip()
    assert said.startswith("error: --workdir must be an absolute path on the desktop"), said
    assert len(said.splitlines()) == 1


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_a_debug_flag_after_the_double_dash_is_the_jobs(fleet: Fleet) -> None:
    done = chiffon(fleet, "run", "--", "echo", "--debug")
    assert done.returncode == 0 and done.stdout == "--debug\n", done.stderr


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_ctrl_c_twice_at_once_is_still_one_clean_cancel(fleet: Fleet) -> None:
    """`timeout -s INT` signals chiffon and then its process group: two SIGINTs at once.
    The second landed while the cancel was being sent and printed a traceback."""
    proc = subprocess.Popen(
        [*CHIFFON, "run", "--name", "twice", "--", "sh", "-c", "echo started; sleep 300"],
        env={**os.environ, "CHIFFON_API_TOKEN": API_TOKEN, "CHIFFON_ORCHESTRATOR_URL": fleet.api},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=EMPTY,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        for pause in (0.0, 0.005, 0.01, 0.02):
            proc.send_signal(signal.SIGINT)
            time.sleep(pause)
        _, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, err
        assert proc.returncode == 130, err
        assert err.count("running on") == 1, err
        with client(fleet) as c:
            [job] = [j for j in c.jobs() if j.name == "twice"]
            wait_for("the cancel", lambda: c.get(job.job_id).state == "cancelled", fleet, 30)
    finally:
        stop(proc)


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_under_nohup_a_hangup_leaves_the_job_running(fleet: Fleet) -> None:
    """`nohup chiffon run ...` asks for the job to outlive the terminal: a SIGHUP the
    program ignores is left ignored."""
    proc = subprocess.Popen(
        ["nohup", *CHIFFON, "run", "--name", "nohup", "--", "sh", "-c", "echo up; sleep 300"],
        env={**os.environ, "CHIFFON_API_TOKEN": API_TOKEN, "CHIFFON_ORCHESTRATOR_URL": fleet.api},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=EMPTY,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None, "still following its job"
        with client(fleet) as c:
            [job] = [j for j in c.jobs() if j.name == "nohup"]
            assert c.get(job.job_id).state == "running"
        proc.send_signal(signal.SIGTERM)  # a signal it does not ignore still cancels
        proc.communicate(timeout=30)
        assert proc.returncode == 143
    finally:
        stop(proc)


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_a_line_not_yet_ended_is_shown_within_a_second(fleet: Fleet) -> None:
    """A prompt or a row of dots is shown while the job still runs, not held back."""
    script = "printf 'Epoch 1 ...'; sleep 300"
    proc = subprocess.Popen(
        [*CHIFFON, "run", "--name", "unended", "--", "sh", "-c", script],
        env={**os.environ, "CHIFFON_API_TOKEN": API_TOKEN, "CHIFFON_ORCHESTRATOR_URL": fleet.api},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        seen, deadline = b"", time.monotonic() + 15
        while b"Epoch 1 ..." not in seen and time.monotonic() < deadline:
            seen += proc.stdout.read() or b""
            time.sleep(0.1)
        assert seen == b"Epoch 1 ...", seen
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        stop(proc)


@pytest.mark.parametrize("fleet", ["sqlite-http"], indirect=True)
def test_client_run_cancels_a_job_whose_submit_a_signal_interrupted(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal while the submit is in flight waits for the job's id; then the job is
    cancelled. A second signal while the cancel is sent does not stop the cancel."""
    from chiffon.client import Interrupted

    with client(fleet) as c:
        submit, cancel = c.submit, c.cancel

        def submit_then_signal(*args: object, **kwargs: object) -> object:
            accepted = submit(*args, **kwargs)  # type: ignore[arg-type]
            os.kill(os.getpid(), signal.SIGTERM)  # arrives before the answer is used
            return accepted

        def cancel_twice(job_id: uuid.UUID | str) -> object:
            os.kill(os.getpid(), signal.SIGINT)  # a second signal, mid-cancel
            return cancel(job_id)

        monkeypatch.setattr(c, "submit", submit_then_signal)
        monkeypatch.setattr(c, "cancel", cancel_twice)
        with pytest.raises(Interrupted):
            c.run(["sleep", "300"], name="signalled-submit")
        [job] = [j for j in c.jobs() if j.name == "signalled-submit"]
        wait_for("the cancel", lambda: c.get(job.job_id).state == "cancelled", fleet, 30)
