"""Jobs on the API: what a user submits, and what they read back (pydantic).

The states a job moves through, and their table, are the dispatch contract's
(`schemas.dispatch`); docs/jobs.md describes the same for people.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from chiffon.schemas import files, limits
from chiffon.schemas.dispatch import COMMAND_MAX_ITEMS, JobState
from chiffon.schemas.heartbeat import LabelKey, LabelValue, ShortText

Policy = Literal["best_fit", "spread"]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="a SHA-256, in hex")]
OutPattern = Annotated[
    str, Field(min_length=1, max_length=files.OUT_PATTERN_MAX_CHARS, pattern=r"^[^\x00\\]*$")
]


ARG_MAX_CHARS = 8192
ARGV_MAX_CHARS = 64 * 1024
ENV_MAX_ITEMS = 256
ENV_VALUE_MAX_CHARS = 8192
TIMEOUT_MAX_SECONDS = 30 * 86400
RETRIES_MAX = 10
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Set by the agent for every job (docs/jobs.md); a user may not override them.
RESERVED_ENV_PREFIXES = ("CHIFFON_",)
RESERVED_ENV = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "NVIDIA_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
    }
)


def _integral(value: object) -> object:
    """1.0 is the integer JSON Schema says it is; "1" and 1.5 stay refused (strict)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# After the bounds in `Annotated`, so that they stay the schema's minimum and maximum.
INTEGRAL = BeforeValidator(_integral)
Arg = Annotated[str, Field(max_length=ARG_MAX_CHARS, pattern=r"^[^\x00]*$")]
# A variable name, and not one the agent sets for every job (RESERVED_ENV, CHIFFON_*).
EnvName = Annotated[
    str,
    Field(
        pattern=r"^(?!CHIFFON_|(?:CUDA_VISIBLE_DEVICES|CUDA_DEVICE_ORDER|NVIDIA_VISIBLE_DEVICES"
        r"|ROCR_VISIBLE_DEVICES|HIP_VISIBLE_DEVICES)$)[A-Za-z_][A-Za-z0-9_]{0,127}$"
    ),
]
EnvValue = Annotated[str, Field(max_length=ENV_VALUE_MAX_CHARS, pattern=r"^[^\x00]*$")]
WORKDIR_MAX_CHARS = 4096
# The user's own words for the pattern below (`JobSubmit._workdir`); the pattern stays in
# the schema, so the document says every rule the server applies.
WORKDIR_NOT_ABSOLUTE = "workdir must be an absolute path on the desktop"
Workdir = Annotated[
    str,
    Field(
        min_length=1,
        max_length=WORKDIR_MAX_CHARS,
        pattern=r"^/[^\x00]*$",
        description="the folder the job starts in, an absolute path on the desktop "
        "(default: a fresh folder per attempt)",
    ),
]


class JobRequirements(BaseModel):
    """What the job needs on one desktop. `vram_gb` is free memory on *each* GPU; asking
    for VRAM without saying how many GPUs asks for one."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)

    gpus: Annotated[int, Field(ge=0, le=limits.GPUS_MAX), INTEGRAL] = 0
    vram_gb: Annotated[float, Field(ge=0, le=limits.GPU_GB_MAX)] = 0.0
    cpu_cores: Annotated[float, Field(ge=0, le=limits.CORES_MAX)] = 0.0
    memory_gb: Annotated[float, Field(ge=0, le=limits.GB_MAX)] = 0.0
    pool: ShortText | None = None
    labels: Annotated[
        dict[LabelKey, LabelValue],
        Field(max_length=32, json_schema_extra={"additionalProperties": False}),
    ] = {}
    gpu_vendor: limits.GpuVendor | None = None
    require_sandbox: bool = Field(
        False,
        description="only a desktop whose job sandbox is full: its processes contained "
        "(cgroup, pidns), its memory capped and the owner's home hidden (docs/jobs.md)",
    )

    @model_validator(mode="before")
    @classmethod
    def _vram_means_a_gpu(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("vram_gb") and "gpus" not in data:
            return {**data, "gpus": 1}
        return data


class JobSubmit(BaseModel):
    """`POST /api/v1/jobs`: an argv list (no shell unless it says `sh -c`), run once."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, strict=True, regex_engine="python-re"
    )

    command: Annotated[
        list[Arg],
        Field(
            min_length=1,
            max_length=COMMAND_MAX_ITEMS,
            description="argv: the program, then its arguments; no shell",
            # The program's name may not be empty (JSON Schema 2020-12, as OpenAPI 3.1).
            # `items` no longer applies to an item `prefixItems` describes: the program's
            # entry repeats every rule of `Arg` (a NUL in its name read as valid).
            json_schema_extra={
                "prefixItems": [
                    {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": ARG_MAX_CHARS,
                        "pattern": r"^[^\x00]*$",
                    }
                ]
            },
        ),
    ]
    name: ShortText | None = None
    requirements: JobRequirements = JobRequirements()
    env: Annotated[
        dict[EnvName, EnvValue],
        Field(
            max_length=ENV_MAX_ITEMS,
            json_schema_extra={"additionalProperties": False},  # only names the pattern allows
        ),
    ] = {}
    workdir: Workdir | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=TIMEOUT_MAX_SECONDS)] | None = None
    retries: Annotated[int, Field(ge=0, le=RETRIES_MAX), INTEGRAL] = 0
    retry_on_exit: bool = False
    policy: Policy = "best_fit"
    snapshot: Sha256 | None = Field(
        None,
        description="the manifest (its SHA-256) of the files the job runs in: laid into its "
        "folder on the desktop; the manifest and every blob it names must be in the store "
        "(`PUT /api/v1/blobs/{sha256}`) first",
    )
    outputs: Annotated[
        list[OutPattern],
        Field(
            max_length=files.OUT_PATTERNS_MAX,
            description="globs relative to the job's folder (`results/**`, `model.pt`): what "
            "comes back when an attempt ends (`GET /api/v1/jobs/{id}/files`)",
        ),
    ] = []
    checkpoint_every_seconds: Annotated[float, Field(ge=10, le=TIMEOUT_MAX_SECONDS)] | None = Field(
        None,
        description="save CHIFFON_CHECKPOINT_DIR this often while the job runs (it is "
        "always saved when an attempt ends)",
    )
    python_env: bool = Field(
        False,
        description="build the snapshot's uv.lock or requirements.txt into a cached "
        "environment on the desktop and run the job in it",
    )

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                files.check_out_pattern(pattern)
            except files.ManifestError as exc:
                raise ValueError(str(exc)) from None
        return patterns

    @model_validator(mode="after")
    def _files_need_a_folder_of_their_own(self) -> JobSubmit:
        if self.snapshot is not None and self.workdir is not None:
            raise ValueError("snapshot and workdir: a job runs in its snapshot's copy or in "
                             "a folder of the desktop, not both")  # fmt: skip
        if self.outputs and self.workdir is not None:
            raise ValueError("outputs come back from the job's own folder, not from a "
                             "workdir (the agent would read it as itself)")  # fmt: skip
        if self.python_env and self.workdir is not None:
            raise ValueError("python_env builds the environment of the job's own folder, "
                             "not of a workdir on the desktop")  # fmt: skip
        return self

    @field_validator("command")
    @classmethod
    def _command(cls, argv: list[str]) -> list[str]:
        if not argv[0]:
            raise ValueError("the command's first word (the program) is empty")
        if sum(len(a) for a in argv) > ARGV_MAX_CHARS:
            raise ValueError(f"the command is longer than {ARGV_MAX_CHARS} characters")
        return argv

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, env: object) -> object:
        """Say what is wrong with a name in words (the schema's pattern says the same)."""
        for name in env if isinstance(env, dict) else ():
            if not isinstance(name, str) or not _ENV_NAME.match(name):
                raise ValueError(f"env: {str(name)[:64]!r} is not a variable name")
            if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(f"env: {name} is set by the agent for every job")
        return env

    @field_validator("workdir", mode="before")
    @classmethod
    def _workdir(cls, workdir: object) -> object:
        """Say in words what the pattern says: a relative path (`proj`) would mean nothing
        on a desktop whose agent runs elsewhere."""
        if isinstance(workdir, str) and workdir and not workdir.startswith("/"):
            raise PydanticCustomError(
                "workdir_not_absolute",
                "{rule}, not {given}",
                {"rule": WORKDIR_NOT_ABSOLUTE, "given": repr(workdir[:64])},
            )
        if isinstance(workdir, str) and "\x00" in workdir:
            raise PydanticCustomError("workdir_nul", "workdir may not hold a NUL character")
        return workdir


class JobView(BaseModel):
    """One job as the API shows it. Never the values of its `env` (they may be secrets):
    only their names."""

    job_id: UUID
    name: str | None
    state: JobState
    reason: str = Field(description="why it waits, or how it ended")
    attempt: int = Field(description="the current attempt's number (0: never placed)")
    preemptions: int = Field(
        0, description="attempts a desktop's owner took back (they use no retry; docs/owner.md)"
    )
    agent_id: UUID | None = Field(description="where the current attempt is")
    agent_name: str | None = Field(None, description="that agent's name, while registered")
    gpu_uuids: list[str] = Field([], description="the GPUs its current attempt holds")
    cancel_requested: bool
    command: list[str]
    requirements: JobRequirements
    submitted_at: datetime
    updated_at: datetime
    started_at: datetime | None = Field(
        None, description="when the current attempt started running (null: it has not)"
    )
    ended_at: datetime | None
    exit_code: int | None = Field(
        description="the program's exit status (null: it never ran, or a signal ended it)"
    )
    workdir: str | None = Field(
        None, description="the folder it starts in on the desktop (null: a fresh one)"
    )
    timeout_seconds: float | None = None
    env_names: list[str] = Field(
        [], description="the names of the variables it was given, sorted; never their values"
    )
    snapshot: str | None = Field(None, description="the manifest of the files it runs in")
    outputs: list[str] = Field([], description="the patterns of what comes back")


class JobAttempt(BaseModel):
    attempt: int
    agent_id: UUID
    agent_name: str | None = None
    state: str = Field(description="a job state, or `preempted`/`refused` for one handed back")
    gpu_uuids: list[str]
    assigned_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    exit_code: int | None
    signal: int | None
    reason: str
    peak_vram_gb: dict[str, float] | None = Field(
        None, description="the most VRAM its processes held, by GPU (when the agent could see)"
    )
    log_path: str | None = Field(
        None,
        description="where its whole output is on the desktop, as the agent said when it "
        "started it (null: not said)",
    )
    resumed_from: int | None = Field(
        None, description="the attempt whose checkpoint it started with (null: none)"
    )
    resumed_bytes: int | None = Field(None, description="that checkpoint's size in bytes")
    snapshot_cached: bool | None = Field(
        None,
        description="its desktop had fetched the job's snapshot before (its cache held the "
        "files; placement prefers such a desktop among equally good ones); null: no snapshot",
    )
    log_bytes_cut: int = Field(
        0,
        description="how many bytes at the start of its output the orchestrator no longer "
        "keeps (it keeps a tail; the whole log stays at `log_path`)",
    )


class JobEvent(BaseModel):
    at: datetime
    attempt: int
    from_state: JobState | None
    to_state: JobState
    reason: str


class JobDetail(JobView):
    attempts: list[JobAttempt]
    events: list[JobEvent]


class FileEntry(BaseModel):
    path: str
    sha256: str
    size: int
    exec: bool = False


class FileSet(BaseModel):
    """What one attempt saved: its outputs or its checkpoint, as a manifest in the store."""

    attempt: int
    manifest: str = Field(description="the manifest's SHA-256 (`GET /api/v1/blobs/{sha256}`)")
    bytes: int
    files: int
    saved_at: datetime
    entries: list[FileEntry] = Field(description="each file: fetch it by its sha256")


class JobFiles(BaseModel):
    """`GET /api/v1/jobs/{id}/files`: what the job runs in and what it saved."""

    job_id: UUID
    snapshot: str | None
    outputs: FileSet | None = Field(description="the latest attempt's outputs that were saved")
    checkpoint: FileSet | None = Field(description="the latest checkpoint saved")


class BlobHashes(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    sha256: Annotated[list[Sha256], Field(max_length=files.MAX_FILES)]


class MissingBlobs(BaseModel):
    missing: list[str] = Field(description="those the store lacks: upload them")


class BlobStored(BaseModel):
    sha256: str
    size: int


class FilesSaved(BaseModel):
    """An agent's word that an attempt's outputs or checkpoint are stored whole."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["output", "checkpoint"]
    manifest: Sha256


class JobAccepted(BaseModel):
    job: JobView
    warning: str | None = Field(
        None, description="set when no registered agent could ever hold the job: it waits"
    )


class JobLog(BaseModel):
    """A piece of one attempt's output (stdout and stderr as they interleaved)."""

    job_id: UUID
    attempt: int = Field(description="whose output (default: the current attempt)")
    offset: int = Field(
        description="the byte offset `data` starts at: past the one asked for when the "
        "bytes before it were dropped (the orchestrator keeps a bounded tail)"
    )
    next_offset: int = Field(description="ask from here for what follows")
    data: str = Field(description="UTF-8, undecodable bytes replaced; never half a character")
    done: bool = Field(description="the attempt has ended: nothing more will come")
    skipped_bytes: int = Field(
        0,
        ge=0,
        description="bytes between the offset asked for and `offset` that are no longer "
        "kept (the orchestrator keeps a tail; the whole log stays on the desktop)",
    )
