"""Run a batch through a model so that one bad element cannot fail the others."""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar, Union

__all__ = ["run_isolated"]

log = logging.getLogger(__name__)
In = TypeVar("In")
Out = TypeVar("Out")


def run_isolated(
    fn: Callable[[Sequence[In]], Sequence[Out]], batch: Sequence[In]
) -> list[Union[Out, Exception]]:
    """``fn(batch)``; if that raises, each element again on its own. Failed elements give their exception."""
    try:
        results = list(fn(batch))
        if len(results) != len(batch):
            raise RuntimeError(f"model returned {len(results)} results for {len(batch)} inputs")
        return results
    except Exception as error:  # noqa: BLE001 - any model error is isolated per element
        if len(batch) == 1:
            return [error]
        log.warning("batch of %d failed (%s: %s); retrying each element alone", len(batch), type(error).__name__, error)
    outcomes: list[Union[Out, Exception]] = []
    for element in batch:
        try:
            outcomes.extend(fn([element]))
        except Exception as error:  # noqa: BLE001
            outcomes.append(error)
    return outcomes
