"""Apply a transform to one kind of element of a mixed PCollection and pass the rest through."""

from __future__ import annotations

import apache_beam as beam

__all__ = ["OnlyKind"]


class OnlyKind(beam.PTransform):
    """Run ``inner`` on the elements that are instances of ``kind``; flatten the others back in."""

    def __init__(self, kind: type, inner: beam.PTransform):
        super().__init__()
        self.kind = kind
        self.inner = inner

    def expand(self, pcoll):
        kind = self.kind
        chosen, others = pcoll | "SplitByKind" >> beam.Partition(lambda e, _: 0 if isinstance(e, kind) else 1, 2)
        return (chosen | "Process" >> self.inner, others) | "Rejoin" >> beam.Flatten()
