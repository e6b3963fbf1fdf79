"""A job holds its output's lease for its whole life, wherever it runs (``io.lease``, ``runs_in: job``).

The launcher (``beam-captions`` on a runner other than the DirectRunner, or the Flex Template's
``flex_main.py``) takes the lease and hands its entry's token to the job. ``KeepLease``, right after the
clips are listed, checks on each worker that the job holds the lease (a job that does not is refused: it
fails before any clip is decoded) and keeps it fresh from then on (``io.lease_keeper``). ``GiveBackLease``,
after the last write of a batch job, removes the job's entry. A streaming job runs until it is drained or
cancelled; its lease then goes stale ``JOB_STALE_S`` after its workers stop.
"""

from __future__ import annotations

import apache_beam as beam

from beam_captions.io.lease import lease_path, leave
from beam_captions.io.lease_keeper import keep

__all__ = ["GiveBackLease", "KeepLease"]


class _Keep(beam.DoFn):
    def __init__(self, output: str, token: str):
        self.output, self.token = output, token

    def start_bundle(self):
        keep(self.output, self.token)

    def process(self, element):
        yield element


class KeepLease(beam.PTransform):
    """Pass every element on; each worker first checks that the job holds the lease and keeps it fresh."""

    def __init__(self, output: str, token: str):
        super().__init__()
        self.output, self.token = output, token

    def expand(self, pcoll):
        return pcoll | "Keep" >> beam.ParDo(_Keep(self.output, self.token))


def _give_back(_written: int, output: str, token: str) -> None:
    leave(lease_path(output), token)


class GiveBackLease(beam.PTransform):
    """Once every element of the job's last writes has passed (batch): the job's entry leaves the lease."""

    def __init__(self, output: str, token: str):
        super().__init__()
        self.output, self.token = output, token

    def expand(self, written):
        return (written
                | "AllWritten" >> beam.combiners.Count.Globally()
                | "GiveBack" >> beam.Map(_give_back, self.output, self.token))
