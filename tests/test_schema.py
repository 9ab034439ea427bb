"""The wire message refuses what no real desktop could send."""

from __future__ import annotations

import json

import pytest

from chiffon.schemas.heartbeat import RejectedMessage, parse_message
from tests import factories as f


def _body(**changes: object) -> dict[str, object]:
    body = json.loads(f.raw(f.message(res=f.resources(gpus_free_total=[(6.0, 8.0)]))))
    for path, value in changes.items():
        target = body
        *parents, leaf = path.split("__")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[leaf] = value
    return body


def test_a_valid_heartbeat_round_trips() -> None:
    msg = f.message(res=f.resources(gpus_free_total=[(6.0, 8.0)]))
    assert parse_message(f.raw(msg)) == msg


@pytest.mark.parametrize(
    ("changes", "reason", "fragment"),
    [
        ({"schema_version": 2}, "unknown_schema_version", "schema_version"),
        ({"resources__cpu_cores_physical": -4}, "invalid", "cpu_cores_physical"),
        ({"resources__cpu_cores_physical": "8"}, "invalid", "cpu_cores_physical"),
        ({"resources__gpu_count": 10**9}, "invalid", "gpu_count"),
        ({"resources__memory_available_gb": 1e300}, "invalid", "memory_available_gb"),
        ({"resources__memory_available_gb": 64.0}, "invalid", "free (64.0) is greater"),
        ({"resources__gpus__0__vram_free_gb": 9.0}, "invalid", "free (9.0) is greater"),
        ({"resources__gpu_count": 2}, "invalid", "gpu_count (2)"),
        ({"agent_id": "desk-1234abcd"}, "invalid", "agent_id"),
        ({"sent_at": "2026-01-01T00:00:00"}, "invalid", "sent_at"),  # no timezone
        ({"name": "x" * 256}, "invalid", "name"),
        ({"resources": None}, "invalid", "must carry resources"),
    ],
)
def test_invalid_messages_are_rejected_with_a_reason(
    changes: dict[str, object], reason: str, fragment: str
) -> None:
    with pytest.raises(RejectedMessage) as caught:
        parse_message(json.dumps(_body(**changes)).encode())
    assert caught.value.reason == reason
    assert fragment in caught.value.detail


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_refused(token: bytes) -> None:
    raw = (
        json.dumps(_body()).encode().replace(b'"cpu_load_1min": 1.0', b'"cpu_load_1min": ' + token)
    )
    assert token in raw
    with pytest.raises(RejectedMessage, match="cpu_load_1min"):
        parse_message(raw)


def test_oversized_and_malformed_payloads() -> None:
    with pytest.raises(RejectedMessage) as big:
        parse_message(b"{" + b" " * 70_000 + b"}")
    assert big.value.reason == "too_large"
    with pytest.raises(RejectedMessage) as broken:
        parse_message(b'{"schema_version": 1,')
    assert broken.value.reason == "malformed_json"


def test_unicode_names_within_limits_are_fine() -> None:
    body = _body(name="Ăšťěžka-GPU-台式机-🖥")
    assert parse_message(json.dumps(body).encode()).name == "Ăšťěžka-GPU-台式机-🖥"
