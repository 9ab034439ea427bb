"""Placement: the VRAM ledger's rule, the policies, and the sentence naming the nearest miss."""

from __future__ import annotations

import dataclasses
import random
import types
import typing
import uuid

import pytest

from chiffon.orchestrator.checks import GPU_CHECKS, HOST, Chain, Findings
from chiffon.orchestrator.placement import (
    Candidate,
    Claim,
    Fleet,
    GpuLedger,
    Miss,
    Placement,
    Policy,
    Requirements,
    place,
)
from chiffon.orchestrator.reasons import closest
from chiffon.orchestrator.scheduler import could_ever_hold
from chiffon.orchestrator.scorers import SCORERS


def gpu(index: int, total: float, free: float, *, jobs_used: float | None = 0.0,
        claims: tuple[Claim, ...] = (), vendor: str = "nvidia") -> GpuLedger:  # fmt: skip
    return GpuLedger(f"GPU-{index}", index, vendor, total, free, jobs_used, claims)


def agent(name: str, *gpus: GpuLedger, online: bool = True, accepts: bool = True,
          cores: float = 8, memory: float = 32, pool: str = "p",
          labels: dict[str, str] | None = None) -> Candidate:  # fmt: skip
    return Candidate(name, name, online, accepts, pool, labels or {}, cores, memory, gpus)


# -- the VRAM rule


def test_a_job_that_has_not_grown_into_its_claim_still_holds_all_of_it() -> None:
    # 24 GB; the job's process holds 2 of its 10 GB claim so far; nothing else runs.
    starting = gpu(0, 24, 22, jobs_used=2, claims=(Claim(10, used_gb=2),))
    assert starting.foreign_gb == 0 and starting.available_gb == 14
    grown = gpu(0, 24, 14, jobs_used=10, claims=(Claim(10, used_gb=10),))
    assert grown.available_gb == 14  # the same room before and after it grows
    outgrown = gpu(0, 24, 12, jobs_used=12, claims=(Claim(10, used_gb=12),))
    assert outgrown.available_gb == 12  # what it uses past its claim is held too


def test_a_foreign_process_between_two_heartbeats_takes_its_memory_off_the_ledger() -> None:
    before = gpu(0, 24, 14, jobs_used=10, claims=(Claim(10, used_gb=10),))
    # a game starts and takes 6 GB: free falls, our job's use does not change
    after = gpu(0, 24, 8, jobs_used=10, claims=(Claim(10, used_gb=10),))
    assert (before.available_gb, after.available_gb) == (14, 8)
    assert after.foreign_gb == 6


def test_without_per_process_numbers_memory_is_counted_twice_not_promised_twice() -> None:
    # AMD through sysfs: 10 GB in use, whose is unknown; a 10 GB claim on it
    unknown = gpu(0, 24, 14, jobs_used=None, claims=(Claim(10),), vendor="amd")
    assert unknown.foreign_gb == 10 and unknown.available_gb == 4
    assert gpu(0, None, 10).available_gb == 0 and gpu(0, 24, None).available_gb == 0  # type: ignore[arg-type]


def test_never_placed_on_memory_a_claim_or_a_foreign_process_holds() -> None:
    claimed = agent("a", gpu(0, 24, 24, claims=(Claim(20),)))  # promised, not yet used
    foreign = agent("b", gpu(0, 24, 4))  # 20 GB held by something not ours
    assert isinstance(place(Requirements(gpus=1, vram_gb=4.5), [claimed, foreign]), Miss)
    # 4 GB is left on each; the tie goes to the lower id
    fits = place(Requirements(gpus=1, vram_gb=4), [claimed, foreign])
    assert fits == Placement("a", ("GPU-0",), 1.0)


# -- policies


def test_best_fit_takes_the_tightest_gpu_and_spread_the_emptiest() -> None:
    big = agent("big", gpu(0, 48, 48))
    small = agent("small", gpu(0, 12, 12))
    want = Requirements(gpus=1, vram_gb=8)
    best = place(want, [big, small])
    spread = place(want, [big, small], "spread")
    assert isinstance(best, Placement) and isinstance(spread, Placement)
    assert (best.agent_id, spread.agent_id) == ("small", "big")


def test_best_fit_picks_the_tightest_gpus_on_an_agent_and_enough_of_them() -> None:
    four = agent("four", gpu(0, 24, 24), gpu(1, 24, 9), gpu(2, 24, 12), gpu(3, 24, 3))
    two = place(Requirements(gpus=2, vram_gb=8), [four])
    assert isinstance(two, Placement) and two.gpu_uuids == ("GPU-1", "GPU-2")
    assert isinstance(place(Requirements(gpus=4, vram_gb=8), [four]), Miss)
    zero = place(Requirements(cpu_cores=2), [four])
    assert isinstance(zero, Placement) and zero.gpu_uuids == ()


def test_only_online_agents_that_accept_jobs_in_the_pool_with_the_labels() -> None:
    want = Requirements(gpus=1, vram_gb=1, pool="lab", labels={"room": "b12"})
    fleet = [
        agent("off", gpu(0, 8, 8), online=False, pool="lab", labels={"room": "b12"}),
        agent("owner-says-no", gpu(0, 8, 8), accepts=False, pool="lab", labels={"room": "b12"}),
        agent("elsewhere", gpu(0, 8, 8), pool="studio", labels={"room": "b12"}),
        agent("other-room", gpu(0, 8, 8), pool="lab", labels={"room": "a1"}),
        agent("yes", gpu(0, 8, 8), pool="lab", labels={"room": "b12", "os": "linux"}),
    ]
    placed = place(want, fleet)
    assert isinstance(placed, Placement) and placed.agent_id == "yes"
    amd = place(Requirements(gpus=1, gpu_vendor="amd"), fleet)
    assert isinstance(amd, Miss)


def test_cores_and_memory_are_required_net_of_claims() -> None:
    busy = agent("busy", cores=1, memory=4)
    idle = agent("idle", cores=6, memory=64)
    placed = place(Requirements(cpu_cores=2, memory_gb=16), [busy, idle])
    assert isinstance(placed, Placement) and placed.agent_id == "idle"
    unknown = agent("unknown", cores=None, memory=None)  # type: ignore[arg-type]
    assert isinstance(place(Requirements(cpu_cores=1), [unknown]), Miss)


# -- the nearest miss


def test_the_reason_names_the_nearest_miss_and_who_cannot_take_jobs() -> None:
    fleet = [
        agent("render-01", gpu(0, 8, 3.0)),
        agent("render-02", gpu(0, 8, 6.1), gpu(1, 8, 2.0)),
        agent("gone-1", gpu(0, 24, 24), online=False),
        agent("gone-2", online=False),
        agent("private", gpu(0, 24, 24), accepts=False),
    ]
    missed = place(Requirements(gpus=1, vram_gb=8), fleet)
    assert missed == Miss(
        "no online agent that accepts jobs has 1 GPU with 8 GB free: closest is render-02 "
        "GPU 0 with 6.1 GB; 2 agents offline; 1 does not accept jobs"
    )


def test_an_agent_that_runs_as_root_says_so_and_the_fix_in_the_reason() -> None:
    """`chiffon up` as root: its agent refuses jobs (heartbeat `jobs_withheld: root`), and
    the job that waits says why and what to do, not "1 does not accept jobs"."""
    root = dataclasses.replace(agent("vm-1"), accepts_jobs=False, withheld="root")
    assert place(Requirements(), [root]) == Miss(
        "no online agent that accepts jobs has room; the only agent runs as root and "
        "refuses jobs: restart it with `chiffon up --allow-root-jobs` "
        "(or `chiffon agent --allow-root-jobs`)"
    )
    gone = agent("gone", online=False)
    assert "; the only online agent runs as root and refuses jobs: restart it with" in (
        Fleet([root, gone]).place(Requirements(gpus=1)).reason  # type: ignore[union-attr]
    )


def test_agents_that_refuse_jobs_are_counted_by_the_reason_their_heartbeats_give() -> None:
    def refusing(name: str, why: str | None) -> Candidate:
        return dataclasses.replace(agent(name), accepts_jobs=False, withheld=why)

    fleet = [
        agent("small", gpu(0, 8, 2.0)),
        refusing("a", "owner_active"),
        refusing("b", "owner_active"),
        refusing("c", "never"),
        refusing("d", "root"),
        refusing("e", None),  # an agent that does not say why
    ]
    assert place(Requirements(gpus=1, vram_gb=4), fleet) == Miss(
        "no online agent that accepts jobs has 1 GPU with 4 GB free: closest is small GPU 0 "
        "with 2.0 GB; 1 runs as root and refuses jobs: restart it with "
        "`chiffon up --allow-root-jobs` (or `chiffon agent --allow-root-jobs`); "
        "2 do not accept jobs (their owners are using them); "
        "1 does not accept jobs (its owner did not opt in: accept_jobs); "
        "1 does not accept jobs"
    )


@pytest.mark.parametrize(
    ("want", "reason"),
    [
        (
            Requirements(cpu_cores=4, memory_gb=64),
            "no online agent that accepts jobs has 4 free cores and 64 GB free memory: "
            "closest is a (2 free cores, 16.0 GB free memory)",
        ),
        (
            Requirements(gpus=2, vram_gb=4, pool="studio"),
            "no online agent that accepts jobs in pool 'studio' has 2 GPUs with 4 GB free",
        ),
    ],
)
def test_reasons_say_what_was_asked(want: Requirements, reason: str) -> None:
    assert place(want, [agent("a", gpu(0, 8, 8), cores=2, memory=16)]) == Miss(reason)


# -- the index a pass places through (Fleet): the same answers as place() over everyone


def _random_fleet(rng: random.Random, agents: int) -> list[Candidate]:
    fleet = []
    for n in range(agents):
        gpus = tuple(
            dataclasses.replace(
                gpu(i, 24, rng.choice([2.0, 6.0, 8.0, 8.0, 12.5, 16.0, 24.0]),
                    vendor=rng.choice(["nvidia", "nvidia", "amd"])),
                uuid=f"GPU-{n}-{i}",
                withheld=rng.choice([None] * 6 + ["owner_active", "dirty"]),
            )
            for i in range(rng.randint(0, 3))
        )  # fmt: skip
        c = agent(f"a{n:03d}", *gpus, online=rng.random() > 0.1, accepts=rng.random() > 0.1,
                  cores=rng.choice([2, 8, 16]), pool=rng.choice(["p", "q"]),
                  labels={"room": rng.choice(["a", "b"])})  # fmt: skip
        fleet.append(dataclasses.replace(c, setbacks=rng.choice([0, 0, 0, 1, 3]),
                                         sandbox=rng.choice(_SANDBOXES)))  # fmt: skip
    return fleet


# What heartbeats say of a desktop's sandbox: full twice, and each way of not being full.
FULL = {"processes": "cgroup", "memory_limit": True, "home_hidden": True, "devices_hidden": True,
        "why": [], "required": False}  # fmt: skip
_SANDBOXES = [
    None,
    FULL,
    {**FULL, "processes": "pidns", "devices_hidden": False},
    {**FULL, "processes": "subreaper"},
    {**FULL, "memory_limit": False, "why": ["no cgroup v2"]},
    {**FULL, "home_hidden": False},
]


@pytest.mark.parametrize("seed", range(6))
def test_the_fleet_index_places_as_place_does_job_after_job(seed: int) -> None:
    rng = random.Random(seed)
    candidates = {c.agent_id: c for c in _random_fleet(rng, 60)}
    fleet = Fleet(list(candidates.values()))
    for _ in range(150):
        want = Requirements(
            gpus=rng.choice([1, 1, 1, 2, 0]), vram_gb=rng.choice([0.0, 4.0, 8.0, 12.0, 20.0]),
            cpu_cores=rng.choice([0, 1, 4]), pool=rng.choice([None, "p"]),
            labels=rng.choice([{}, {"room": "a"}]), gpu_vendor=rng.choice([None, "nvidia"]),
            avoid=frozenset(rng.sample(sorted(candidates), 2)), long=rng.random() < 0.5,
            require_sandbox=rng.random() < 0.3,
        )  # fmt: skip
        policy = rng.choice(["best_fit", "best_fit", "spread"])
        expected = place(want, list(candidates.values()), policy)  # type: ignore[arg-type]
        assert fleet.place(want, policy) == expected  # type: ignore[arg-type]
        if isinstance(expected, Placement):  # claim what it took, as the scheduler does
            c = candidates[expected.agent_id]
            took = [
                dataclasses.replace(g, claims=(*g.claims, Claim(want.vram_gb)))
                if g.uuid in expected.gpu_uuids else g
                for g in c.gpus
            ]  # fmt: skip
            cores = (
                None if c.cpu_cores_available is None else c.cpu_cores_available - want.cpu_cores
            )
            c = dataclasses.replace(c, gpus=tuple(took), cpu_cores_available=cores)
            candidates[c.agent_id] = c
            fleet.update(c, placed=True)


def test_a_miss_is_said_again_without_a_search_until_an_agent_has_more_room() -> None:
    small = agent("small", gpu(0, 8, 6))
    fleet = Fleet([small])
    want = Requirements(gpus=1, vram_gb=12)
    first = fleet.place(want)
    assert isinstance(first, Miss) and fleet.place(want) is first  # kept
    fleet.update(agent("small", gpu(0, 24, 20)))  # read again under its lock: it grew
    assert isinstance(fleet.place(want), Placement)


def test_in_a_lane_a_job_takes_the_best_fit_there_and_any_agent_when_none_fits() -> None:
    """Two orchestrators in different lanes place on different agents; a lane with no
    room is no reason to wait."""
    # agent ids end in 0..3: one agent per lane (LANES = 4); "a-0" is the tightest fit
    fleet = Fleet([agent(f"a-{n}", gpu(0, 24, 10 + n)) for n in range(4)])
    want = Requirements(gpus=1, vram_gb=8)
    best = fleet.place(want)
    assert isinstance(best, Placement) and best.agent_id == "a-0"
    fleet.lane = 2
    in_lane = fleet.place(want)
    assert isinstance(in_lane, Placement) and in_lane.agent_id == "a-2"
    big = Requirements(gpus=1, vram_gb=12.5)  # fits a-3 only, not in lane 2
    fallback = fleet.place(big)
    assert isinstance(fallback, Placement) and fallback.agent_id == "a-3"


def test_a_miss_with_agents_left_out_is_kept_only_when_none_of_them_fits() -> None:
    """A reserved agent is left out of a pass: a job it could hold misses now but is not
    taken for a miss over all agents; a job nothing holds is (said again without a search)."""
    fleet = Fleet([agent("a", gpu(0, 24, 20)), agent("b", gpu(0, 8, 6))])
    fits_a = Requirements(gpus=1, vram_gb=12)
    assert isinstance(fleet.place(fits_a, exclude=frozenset({"a"})), Miss)
    again = fleet.place(fits_a)
    assert isinstance(again, Placement) and again.agent_id == "a"
    too_big = Requirements(gpus=1, vram_gb=30)
    first = fleet.place(too_big, exclude=frozenset({"a"}))
    assert isinstance(first, Miss) and fleet.place(too_big) is first
    assert fleet.known_miss(too_big) is first and fleet.known_miss(fits_a) is None


# -- the chain of checks and the scorers


def test_each_check_of_the_chain_says_why_a_desktop_does_not_fit() -> None:
    """The first check that fails names the reason, and the miss's sentence is what the
    checks found: the headline's closest among those that passed who may take the job."""
    want = Requirements(gpus=1, vram_gb=8, cpu_cores=2, pool="p", labels={"room": "a"},
                        avoid=frozenset({"avoided"}))  # fmt: skip
    room_a = {"room": "a"}
    fleet = {
        "offline": agent("offline", gpu(0, 24, 24), online=False, labels=room_a),
        "refuses": agent("refuses", gpu(0, 24, 24), accepts=False, labels=room_a),
        "avoided": agent("avoided", gpu(0, 24, 24), labels=room_a),
        "pool": agent("pool", gpu(0, 24, 24), pool="q", labels=room_a),
        "labels": agent("labels", gpu(0, 24, 24)),
        "cores": agent("cores", gpu(0, 24, 24), cores=1, labels=room_a),
        "gpus": agent("gpus", gpu(0, 24, 6), labels=room_a),
        None: agent("fits", gpu(0, 24, 24), labels=room_a),
    }
    chain = Chain.of(want)
    assert {why: chain.miss(c) for why, c in fleet.items()} == {why: why for why in fleet}
    found = Findings.of(want, list(fleet.values()))
    assert [c.name for c in found.eligible] == ["cores", "gpus", "fits"]


@pytest.mark.parametrize("seed", range(3))
def test_a_chain_leaves_out_only_the_checks_that_cannot_fail_for_the_job(seed: int) -> None:
    rng = random.Random(seed)
    fleet = _random_fleet(rng, 60)
    for _ in range(100):
        want = Requirements(
            gpus=rng.choice([0, 1, 2]), vram_gb=rng.choice([0.0, 8.0]),
            cpu_cores=rng.choice([0, 4]), memory_gb=rng.choice([0, 16]),
            pool=rng.choice([None, "p"]), labels=rng.choice([{}, {"room": "a"}]),
            gpu_vendor=rng.choice([None, "amd"]), avoid=frozenset(rng.sample(["a001", "a002"], 1)),
            require_sandbox=rng.random() < 0.5,
        )  # fmt: skip
        every = Chain(want, tuple(c.test for c in HOST), tuple(c.test for c in GPU_CHECKS),
                      want.gpus > 0)  # fmt: skip
        applying = Chain.of(want)
        assert [applying.miss(c) for c in fleet] == [every.miss(c) for c in fleet]


def test_every_policy_the_api_takes_has_a_scorer() -> None:
    assert set(SCORERS) == set(typing.get_args(Policy))


def test_a_new_policy_is_one_scorer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scorer that prefers the desktop with the most free cores, plugged in by name: the
    checks, the ranking and the fleet's index take it as they take best fit and spread."""

    class MostCores:
        tightest_first = False

        def gpu_key(self, g: GpuLedger) -> tuple[float, int]:
            return (g.available_gb, g.index)

        def score(self, left_gb: float, core_share: float) -> float:
            return -core_share

    monkeypatch.setitem(SCORERS, "most_cores", MostCores())  # type: ignore[arg-type]
    fleet = [agent("few", gpu(0, 24, 9), cores=2), agent("many", gpu(0, 24, 24), cores=16)]
    want = Requirements(gpus=1, vram_gb=8, cpu_cores=1)
    for placed in (place(want, fleet, "most_cores"), Fleet(fleet).place(want, "most_cores")):  # type: ignore[arg-type]
        assert isinstance(placed, Placement) and placed.agent_id == "many"
    assert place(want, fleet).agent_id == "few"  # type: ignore[union-attr]


def test_a_desktop_is_counted_once_in_the_reason_by_the_first_check_it_fails() -> None:
    """An avoided desktop that also refuses jobs counts as refusing; the GPUs withheld on
    a desktop in another pool are not the job's concern."""
    mine = dataclasses.replace(agent("mine", accepts=False), withheld="owner_active")
    elsewhere = agent("elsewhere", dataclasses.replace(gpu(0, 24, 24), withheld="dirty"), pool="q")
    want = Requirements(gpus=1, vram_gb=4, pool="p", avoid=frozenset({"mine"}))
    assert place(want, [mine, elsewhere]) == Miss(
        "no online agent that accepts jobs in pool 'p' has 1 GPU with 4 GB free; "
        "1 does not accept jobs (its owner is using it)"
    )


# -- the sandbox (--require-sandbox)


def test_a_job_that_requires_the_sandbox_lands_only_where_it_is_full() -> None:
    """Full: processes contained (cgroup or pidns), memory capped, the owner's home hidden;
    hidden devices are not asked. A desktop that says nothing (an older agent) is not."""
    fleet = [
        dataclasses.replace(agent(name, gpu(0, 24, free)), sandbox=sandbox)
        for name, free, sandbox in [
            ("silent", 8, None),
            ("subreaper", 8, {**FULL, "processes": "subreaper"}),
            ("no-memory-limit", 8, {**FULL, "memory_limit": False}),
            ("home-shown", 8, {**FULL, "home_hidden": False}),
            ("pidns", 20, {**FULL, "processes": "pidns", "devices_hidden": False}),
            ("cgroup", 24, FULL),
        ]
    ]
    want = Requirements(gpus=1, vram_gb=4, require_sandbox=True)
    placed = place(want, fleet)
    assert isinstance(placed, Placement) and placed.agent_id == "pidns"  # the tightest full
    assert place(dataclasses.replace(want, require_sandbox=False), fleet).agent_id == "home-shown"  # type: ignore[union-attr]
    chain = Chain.of(want)
    assert [chain.miss(c) for c in fleet] == ["sandbox"] * 4 + [None, None]
    # the same through the fleet's index, whose views and kept misses tell the two apart
    index = Fleet(fleet)
    assert index.place(dataclasses.replace(want, require_sandbox=False)).agent_id == "home-shown"  # type: ignore[union-attr]
    assert index.place(want) == place(want, fleet)


def test_a_desktop_not_sandboxed_is_counted_in_the_reason_with_what_it_lacks_and_why() -> None:
    lacking = dataclasses.replace(
        agent("render-01", gpu(0, 24, 24)),
        sandbox={**FULL, "processes": "pidns", "memory_limit": False,
                 "why": ["cgroup v2 memory controller not delegated to this user"]},
    )  # fmt: skip
    want = Requirements(gpus=1, vram_gb=8, require_sandbox=True)
    assert place(want, [lacking]) == Miss(
        "no online agent that accepts jobs and is fully sandboxed has 1 GPU with 8 GB free; "
        "1 not sandboxed (no memory limit: cgroup v2 memory controller not delegated to this "
        "user)"
    )
    several = [
        lacking,
        dataclasses.replace(agent("old"), sandbox=None),
        dataclasses.replace(agent("bare"), sandbox={"processes": "none"}),
        dataclasses.replace(agent("nomem"), sandbox={**FULL, "memory_limit": False}),
        dataclasses.replace(agent("small", gpu(0, 8, 6)), sandbox=FULL),
    ]
    assert place(want, several) == Miss(
        "no online agent that accepts jobs and is fully sandboxed has 1 GPU with 8 GB free: "
        "closest is small GPU 0 with 6.0 GB; 4 not sandboxed (2 no memory limit, 1 no sandbox "
        "reported, 1 processes not contained, no memory limit, home not hidden)"
    )
    # the reservation of a starving job's closest agent never picks one it cannot run on
    assert closest(want, several).name == "small"  # type: ignore[union-attr]


def test_the_hardware_that_could_ever_hold_a_job_does_not_count_the_sandbox() -> None:
    """Its owner can set the sandbox up later: a job that requires it is not warned about
    as if no desktop's hardware could hold it."""
    row = types.SimpleNamespace(
        agent_id=uuid.uuid4(), name="a", pool_name="p", labels={}, cpu_cores_physical=8,
        resource_metrics={"memory_total_gb": 32, "sandbox": None,
                          "gpus": [{"index": 0, "uuid": "GPU-0", "vendor": "nvidia",
                                    "vram_total_gb": 24, "vram_free_gb": 1}]},
    )  # fmt: skip
    assert could_ever_hold(Requirements(gpus=1, vram_gb=20, require_sandbox=True), [row])  # type: ignore[list-item]


def test_a_desktop_whose_owner_requires_a_sandbox_it_lacks_says_so_in_the_reason() -> None:
    refusing = dataclasses.replace(agent("strict", accepts=False), withheld="unsandboxed")
    assert place(Requirements(cpu_cores=1), [refusing, agent("busy", cores=0)]) == Miss(
        "no online agent that accepts jobs has 1 free cores: closest is busy (0 free cores); "
        "1 does not accept jobs (its owner requires a sandbox it cannot fully enforce: "
        "chiffon probe says why)"
    )
