"""The run's counters (Beam metrics), and reading them back for the summary."""

from __future__ import annotations

from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from beam_captions import progress

__all__ = ["NAMESPACE", "count", "counters"]

NAMESPACE = "beam_captions"


def count(name: str, value: int = 1) -> None:
    """Add ``value`` to the counter ``name`` (a Beam metric, and this process's live progress)."""
    Metrics.counter(NAMESPACE, name).inc(value)
    progress.bump(name, value)


def counters(result) -> dict[str, int]:
    """Every counter of this package in a finished ``PipelineResult``, by name."""
    found: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        found[counter.key.metric.name] = found.get(counter.key.metric.name, 0) + (value or 0)
    return found
