"""Listing at scale on gs:// (issue 29, parts 1 and 3), on the GCS emulator (``gcs.py``: pages of 1,000 names
at most, ``startOffset``, a patch that moves ``updated``, every request recorded).

A large prefix is listed in shards spread over the workers, each clip's version (size, generation) comes
from the listing, and a change of an object's metadata alone never makes a finished clip new again,
while new bytes do. Small plans (pages of 4 names) make a few dozen objects a "large" prefix.
"""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_captions.io.clip_output import write_clip
from beam_captions.io.listing import ListingPlan, Shard, gcs_object_version, list_shard, shard_for
from beam_captions.io.metas import same_version
from beam_captions.metrics import counters
from beam_captions.records import ClipInfo, WindowRecord, clip_id_for
from beam_captions.transforms.read import ReadClips, list_found
from beam_captions.transforms.skip_finished import SkipFinishedClips
from gcs import REQUESTS, gcs, split_uri  # noqa: F401  (module-scoped emulator fixture)

PLAN = ListingPlan(page_size=4, pages_per_shard=2, levels=2)
ONE_LEVEL = ListingPlan(levels=0)  # a few objects: no shards, and fewer steps to run
ASKED = {"captions": {"model": "m"}}
KEPT: list = []  # the clips that went on in the last ``run`` (the DoFn's function is looked up here)


def _keep(clip) -> None:
    KEPT.append(clip)


@pytest.fixture(scope="module")
def bucket(gcs):  # noqa: F811
    """``gs://listing/raw/``: 40 clips named as a camera numbers them, a few others, a non-video, a folder
    placeholder, and an output inside the input (``raw/out/``); returns the clip URIs."""
    gcs.create_bucket("listing")
    names = [f"raw/clip_{i:04d}.mp4" for i in range(0, 400, 10)] + [
        "raw/a/x.mp4", "raw/b.MOV", "raw/zz/é.mkv", "raw/notes.txt", "raw/dir/", "raw/out/metas/x.json"]
    for name in names:
        gcs.upload_bytes(name.encode() * 3, f"gs://listing/{name}")
    return sorted(f"gs://listing/{n}" for n in names if n.lower().endswith((".mp4", ".mov", ".mkv")))


def run(inputs, out: str, extensions=None, plan: ListingPlan = ONE_LEVEL):
    """``ReadClips | SkipFinishedClips``: (counters, clips that go on, requests made)."""
    KEPT.clear()
    REQUESTS.clear()
    pipeline = beam.Pipeline(options=PipelineOptions(["--direct_num_workers", "1"]))
    (pipeline
     | ReadClips(inputs, extensions, exclude=out, plan=plan)
     | SkipFinishedClips(out, ASKED)
     | beam.Map(_keep))
    result = pipeline.run()
    result.wait_until_finish()
    return counters(result), sorted(KEPT, key=lambda clip: clip.source), list(REQUESTS)


def test_a_large_prefix_is_listed_in_shards_that_hold_every_object_once(bucket):
    first = list(list_shard(shard_for("gs://listing/raw/"), PLAN))
    shards = [item for item in first if isinstance(item, Shard)]
    assert len(first) - len(shards) == PLAN.page_size * PLAN.pages_per_shard  # its pages, then the rest handed on
    assert len(shards) > 3 and all(s.level == 1 and s.prefix.startswith("raw/") for s in shards)
    found = list(list_found("gs://listing/raw/", plan=PLAN))
    assert sorted(f.path for f in found) == bucket  # each once; the placeholder, the text and nothing else left out
    assert all(f.version == gcs_object_version(f.path) for f in found)  # size, created, generation
    globbed = sorted(f.path for f in list_found("gs://listing/raw/clip_01*.mp4", plan=PLAN))
    assert globbed == [f"gs://listing/raw/clip_{i:04d}.mp4" for i in range(100, 200, 10)]


def test_read_clips_costs_no_request_per_clip_and_leaves_out_its_output(bucket):
    counts, kept, requests = run(["gs://listing/raw/", "gs://listing/raw/clip_0010.mp4"], "gs://listing/raw/out",
                                 extensions={"*"}, plan=PLAN)
    assert [clip.source for clip in kept] == sorted(bucket + ["gs://listing/raw/notes.txt"])  # every file, once
    assert all(clip.version is not None and len(clip.version) == 3 for clip in kept)
    per_object = [name for kind, name in requests if kind in ("get", "download")]
    assert per_object == ["raw/clip_0010.mp4"]  # only the file named explicitly
    assert counts["listing_shards_done"] == counts["listing_shards"] > 1


def _done(out: str, source: str, version) -> None:
    clip_id = clip_id_for(source)
    window = WindowRecord(clip_id, source, 0, 0, 15, 0.0, 1.6, (0, 15), caption="c", caption_model="m",
                          source_version=version)
    assert write_clip(out, clip_id, [window, ClipInfo(clip_id, source, 96, 64, 10.0, 16, "h264", 1.6, 1,
                                                      source_version=version)], asked=ASKED)


def test_a_metadata_change_keeps_a_clip_done_and_new_bytes_redo_it(gcs):  # noqa: F811
    gcs.create_bucket("versions")
    source, out = "gs://versions/raw/a.mp4", "gs://versions/out"
    gcs.upload_bytes(b"a" * 50, source)
    [found] = list_found(source)
    _done(out, source, found.version)
    blob = gcs.client.bucket("versions").blob("raw/a.mp4")
    blob.reload()
    updated, generation = blob.updated, blob.generation
    blob.metadata = {"label": "reviewed"}
    blob.storage_class = "NEARLINE"
    blob.patch()
    blob.reload()
    assert blob.updated > updated and blob.generation == generation  # as GCS: a new update time, the same bytes
    counts, kept, requests = run(["gs://versions/raw/"], out)
    assert counts["clips_skipped"] == 1 and not kept
    assert not [name for kind, name in requests if kind in ("get", "download")]  # no metas read: the index says done
    gcs.upload_bytes(b"b" * 50, source)  # new bytes, the same size: a new generation
    counts, kept, _ = run(["gs://versions/raw/"], out)
    assert counts.get("clips_skipped", 0) == 0 and counts["clips_replaced"] == 1 and len(kept) == 1


def test_a_metas_of_an_older_release_counts_for_the_same_bytes_only(gcs):  # noqa: F811
    gcs.create_bucket("older")
    source, out = "gs://older/raw/a.mp4", "gs://older/out"
    gcs.upload_bytes(b"a" * 50, source)
    blob = gcs.client.bucket("older").blob("raw/a.mp4")
    blob.reload()
    from apache_beam.io.gcp.gcsio import GcsIO

    older = (int(blob.size), float(GcsIO._updated_to_seconds(blob.updated)))  # what an older release recorded
    _done(out, source, older)
    [found] = list_found(source)
    assert same_version({"size": 50, "modified": older[1]}, found.version)
    assert not same_version({"size": 51, "modified": older[1]}, found.version)
    blob.metadata = {"label": "reviewed"}
    blob.patch()
    counts, kept, _ = run(["gs://older/raw/"], out)
    assert counts["clips_skipped"] == 1 and not kept
    gcs.upload_bytes(b"b" * 50, source)  # written after the recorded update time: other bytes
    counts, kept, _ = run(["gs://older/raw/"], out)
    assert counts["clips_replaced"] == 1 and len(kept) == 1
