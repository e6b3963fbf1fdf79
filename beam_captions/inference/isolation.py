"""Run a batch through a model so that one bad element cannot fail the others."""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar, Union

__all__ = ["is_out_of_memory", "is_engine_dead", "run_isolated"]

log = logging.getLogger(__name__)
In = TypeVar("In")
Out = TypeVar("Out")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA/CPU out-of-memory errors, whatever library raised them."""
    return (
        isinstance(error, MemoryError)
        or type(error).__name__ == "OutOfMemoryError"
        or "out of memory" in str(error).lower()
    )


def is_engine_dead(error: BaseException) -> bool:
    """vLLM's ``EngineDeadError``: the engine process is gone and must be started again."""
    return type(error).__name__ == "EngineDeadError"


def run_isolated(
    fn: Callable[[Sequence[In]], Sequence[Out]], batch: Sequence[In]
) -> list[Union[Out, Exception]]:
    """``fn(batch)``; on out-of-memory, the two halves again (down to single elements); on any other
    error, each element once more on its own. Elements that still fail give their exception."""
    try:
        results = list(fn(batch))
        if len(results) != len(batch):
            raise RuntimeError(f"model returned {len(results)} results for {len(batch)} inputs")
        return results
    except Exception as error:  # noqa: BLE001 - any model error is isolated per element
        if len(batch) == 1:
            return [error]
        if is_out_of_memory(error):
            half = len(batch) // 2
            log.warning("out of memory on a batch of %d; retrying it as %d + %d", len(batch), half, len(batch) - half)
            return run_isolated(fn, batch[:half]) + run_isolated(fn, batch[half:])
        log.warning("batch of %d failed (%s: %s); retrying each element alone", len(batch), type(error).__name__, error)
    outcomes: list[Union[Out, Exception]] = []
    for element in batch:
        try:
            outcomes.extend(fn([element]))
        except Exception as error:  # noqa: BLE001
            outcomes.append(error)
    return outcomes
