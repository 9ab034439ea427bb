"""A job on the wire: what a submission may hold (the state table: test_dispatch_contract)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from chiffon.orchestrator.jobspec import JobSpec
from chiffon.schemas.jobs import JobSubmit


def test_vram_without_a_gpu_count_asks_for_one_gpu() -> None:
    job = JobSubmit.model_validate({"command": ["x"], "requirements": {"vram_gb": 8}})
    assert (job.requirements.gpus, job.requirements.vram_gb) == (1, 8.0)


def test_a_plain_submission_takes_the_defaults() -> None:
    job = JobSubmit.model_validate({"command": ["python", "train.py", "--epochs", "3"]})
    assert job.requirements.gpus == 0 and job.retries == 0 and job.policy == "best_fit"
    assert job.command[0] == "python" and job.env == {} and job.timeout_seconds is None
    assert job.requirements.require_sandbox is False


def test_a_job_may_require_the_sandbox_and_its_parsed_spec_says_so() -> None:
    job = JobSubmit.model_validate({"command": ["x"], "requirements": {"require_sandbox": True}})
    wants = JobSpec.parse(job.model_dump()).wants
    assert wants.require_sandbox is True and wants.stored()["require_sandbox"] is True
    # a job stored before the field existed asks for none
    assert (
        JobSpec.parse({"command": ["x"], "requirements": {"gpus": 1}}).wants.require_sandbox
        is False
    )


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"command": []}, "at least 1 item"),
        ({"command": [""]}, "first word"),
        ({"command": ["x"] * 1025}, "at most 1024 items"),
        ({"command": ["x" * 8193]}, "at most 8192 characters"),
        ({"command": ["x" * 8000] * 9}, "longer than 65536"),
        ({"command": ["a\x00b"]}, "should match pattern"),
        ({"command": ["x"], "env": {"1BAD": "v"}}, "is not a variable name"),
        ({"command": ["x"], "env": {"A=B": "v"}}, "is not a variable name"),
        ({"command": ["x"], "env": {"CUDA_VISIBLE_DEVICES": "0"}}, "set by the agent"),
        ({"command": ["x"], "env": {"CHIFFON_JOB_ID": "1"}}, "set by the agent"),
        ({"command": ["x"], "env": {f"V{i}": "" for i in range(257)}}, "at most 256 items"),
        ({"command": ["x"], "requirements": {"vram_gb": math.nan, "gpus": 1}}, "finite"),
        ({"command": ["x"], "requirements": {"gpus": -1}}, "greater than or equal to 0"),
        ({"command": ["x"], "requirements": {"gpus": 1, "vram_gb": 1e9}}, "less than or equal"),
        ({"command": ["x"], "retry_on_exit": 0}, "valid boolean"),  # strict: no 0 for false
        ({"command": ["x"], "requirements": {"gpus": "1"}}, "valid integer"),
        ({"command": ["x"], "requirements": {"gpu": 1}}, "Extra inputs are not permitted"),
        ({"command": ["x"], "timeout_seconds": 0}, "greater than 0"),
        ({"command": ["x"], "retries": 11}, "less than or equal to 10"),
        (
            {"command": ["x"], "workdir": "relative/dir"},
            "workdir must be an absolute path on the desktop, not 'relative/dir'",
        ),
        ({"command": ["x"], "workdir": "/a\x00b"}, "workdir may not hold a NUL character"),
        ({"command": ["x"], "workdir": ""}, "at least 1 character"),
        ({"command": ["x"], "shell": True}, "Extra inputs are not permitted"),
        ({"command": ["x"], "requirements": {"require_sandbox": "yes"}}, "valid boolean"),
        ({"command": ["x"], "requirements": {"require_sandbox": 1}}, "valid boolean"),
    ],
)
def test_bad_submissions_are_refused_with_what_was_wrong(body: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        JobSubmit.model_validate(body)


def test_the_document_keeps_the_workdir_rule_the_words_say() -> None:
    """The server says "absolute path" in words, and the schema still says it as a
    pattern: every rule the server applies stays in the OpenAPI document."""
    workdir = JobSubmit.model_json_schema()["properties"]["workdir"]["anyOf"][0]
    assert workdir["pattern"] == "^/[^\\x00]*$"
    assert (workdir["minLength"], workdir["maxLength"]) == (1, 4096)
