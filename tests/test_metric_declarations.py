"""The metric declarations: what is derived from them stays in step with them."""

from __future__ import annotations

import pytest

from chiffon.persistence.models import AgentMetricsRow, AgentRow
from chiffon.schemas.api import AgentCapacity, MetricPoint
from chiffon.schemas.heartbeat import Resources
from chiffon.schemas.metrics import BOUNDS, HISTORY, METRICS, REGISTRY, Metric, check_fields
from tests import factories as f


def test_a_misspelled_metric_fails_at_import_not_as_a_null_column() -> None:
    with pytest.raises(ValueError, match="'memory_availabel_gb' is not a field of Resources"):
        check_fields((Metric("memory_availabel_gb", float),), Resources.model_fields)


def test_every_declared_metric_has_its_column_and_api_field() -> None:
    registry_columns = set(AgentRow.__table__.c.keys())
    history_columns = set(AgentMetricsRow.__table__.c.keys())
    assert {m.name for m in REGISTRY} <= registry_columns
    assert {m.name for m in HISTORY} <= history_columns
    assert [m.name for m in REGISTRY] == [
        name for name in AgentCapacity.model_fields if name in {m.name for m in METRICS}
    ]
    assert [m.name for m in HISTORY] == [
        name for name in MetricPoint.model_fields if name in {m.name for m in METRICS}
    ]
    # A metric that may be unknown is a nullable column; one with a default is not.
    for m in REGISTRY:
        assert AgentRow.__table__.c[m.name].nullable is (m.default is None), m.name


def test_bounds_have_distinct_parameters_and_options() -> None:
    params = [b.param for _, b in BOUNDS]
    options = [b.option for _, b in BOUNDS]
    assert len(set(params)) == len(params) and len(set(options)) == len(options)
    assert all(m.registry for m, _ in BOUNDS)  # a filter reads the registry's column


def test_the_hottest_gpu_is_derived_from_the_gpus() -> None:
    [temperature] = [m for m in METRICS if m.name == "gpu_temperature_max_c"]
    hot = f.resources(gpus_free_total=[(1, 8), (1, 8), (1, 8)], temperatures=[40, None, 66.5])
    assert temperature.value(hot) == 66.5
    assert temperature.value(f.resources(gpus_free_total=[(1, 8)])) is None
    assert temperature.value(f.resources()) is None
