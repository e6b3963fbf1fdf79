"""Apply a transform to the elements that match a predicate and pass the rest through."""

from __future__ import annotations

from typing import Callable

import apache_beam as beam

__all__ = ["OnlyWhere", "is_kind"]


def is_kind(kind: type) -> Callable[[object], bool]:
    return lambda element: isinstance(element, kind)


class OnlyWhere(beam.PTransform):
    """Run ``inner`` on the elements for which ``predicate`` holds; flatten the others back in."""

    def __init__(self, predicate: Callable[[object], bool], inner: beam.PTransform):
        super().__init__()
        self.predicate = predicate
        self.inner = inner

    def expand(self, pcoll):
        predicate = self.predicate
        chosen, others = pcoll | "Split" >> beam.Partition(lambda e, _: 0 if predicate(e) else 1, 2)
        return (chosen | "Process" >> self.inner, others) | "Rejoin" >> beam.Flatten()
