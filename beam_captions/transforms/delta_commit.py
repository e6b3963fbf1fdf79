"""CommitToDelta: the committer step of a ``--captions-table delta`` pipeline that nobody waits for (a
template's job, a pipeline of your own). A job that ``beam-captions`` launches and waits for has no such
step: the launcher commits while it runs (``io.delta_committer.CommitLoop``).

Every clip the writers finished (their ``Written`` markers, or plain clip ids) goes under one constant
key to a committer (``io.delta_committer.Committer``) that commits ``batch_size`` clips per Delta
transaction. Streaming: Beam's ``GroupIntoBatches`` makes the batches, a batch is committed when it holds
``batch_size`` clips or when its first clip has waited ``max_buffering_duration_secs`` (a processing-time
timer, which Beam's local runner runs only on its bundle-based executor, where the streaming read cannot
run). Batch: a ``GroupByKey`` gathers the clips and the committer cuts them into batches; a batch runner
starts that stage once the writes are done, so the table gets the job's rows at its end. One key means
one committer at a time per job.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import apache_beam as beam
from apache_beam import typehints
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.transforms.window import GlobalWindows

from beam_captions.io.delta_committer import BATCH_CLIPS, Committer
from beam_captions.metrics import count

__all__ = ["CommitToDelta", "COMMIT_KEY"]

COMMIT_KEY = "delta-commit"
MAX_BUFFERING_S = 5.0


def _clip_id(element: Any) -> str:
    return element if isinstance(element, str) else element.clip_id


def _batches(keyed: tuple[str, Iterable[str]], size: int) -> Iterator[tuple[str, list[str]]]:
    key, clip_ids = keyed
    batch: list[str] = []
    for clip_id in clip_ids:
        batch.append(clip_id)
        if len(batch) == size:
            yield key, batch
            batch = []
    if batch:
        yield key, batch


class _Commit(beam.DoFn):
    """Commits one batch of clips (``Committer.commit``), counts and outputs what it did."""

    def __init__(self, output: str):
        self.output = output
        self.committer: Optional[Committer] = None

    def setup(self):
        self.committer = Committer(self.output)

    def process(self, batch):
        _key, clip_ids = batch
        done = self.committer.commit(list(clip_ids))
        for name, value in done.items():
            count(name, value)
        yield done


class CommitToDelta(beam.PTransform):
    """Commit the staged rows of the clips in the input (clip ids, or anything with ``clip_id``) to the
    Delta table of ``output``, ``batch_size`` clips per transaction at most; outputs each commit's counters."""

    def __init__(self, output: str, batch_size: int = BATCH_CLIPS,
                 max_buffering_duration_secs: Optional[float] = MAX_BUFFERING_S):
        super().__init__()
        self.output = output
        self.batch_size = batch_size
        self.max_buffering_duration_secs = max_buffering_duration_secs

    def expand(self, written):
        keyed = (
            written
            | "Key" >> beam.Map(lambda e: (COMMIT_KEY, _clip_id(e))).with_output_types(typehints.Tuple[str, str])
            | "Global" >> beam.WindowInto(GlobalWindows())
        )
        if written.pipeline.options.view_as(StandardOptions).streaming or not written.is_bounded:
            batches = keyed | "Batch" >> beam.GroupIntoBatches(
                self.batch_size, max_buffering_duration_secs=self.max_buffering_duration_secs)
        else:
            batches = (
                keyed
                | "Gather" >> beam.GroupByKey()
                | "Batch" >> beam.FlatMap(_batches, self.batch_size)
            )
        return batches | "Commit" >> beam.ParDo(_Commit(self.output))
