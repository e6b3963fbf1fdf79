"""The whole job against object storage: clips read from one emulated GCS bucket, every output written to another.

The emulator (gcp-storage-emulator) speaks the GCS JSON API on loopback; Beam's gcsio and the
google-cloud-storage client both reach it through ``STORAGE_EMULATOR_HOST`` (see ``gcs.py``). The
outputs are read back with the storage client, not through the pipeline's own code.
"""

from __future__ import annotations

import io
import json
import os
import time

import av
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_captions.cli import run_job
from beam_captions.media.windowing import compute_windows, num_preview_frames
from beam_captions.records import clip_id_for
from conftest import VLLM_KWARGS
from gcs import gcs  # noqa: F401  (module-scoped emulator fixture)

WINDOW_SIZE, THRESHOLD, MAX_TOKENS = 64, 32, 16
RAW, OUT = "gs://in-bucket/raw", "gs://out-bucket/run"
BROKEN = "not-a-video.mp4"


def frames_and_rate(path: str) -> tuple[int, float]:
    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), float(stream.average_rate)


@pytest.fixture(scope="module")
def gcs_job(gcs, real_clips_dir, captioner_dir):  # noqa: F811
    gcs.create_bucket("in-bucket")
    gcs.create_bucket("out-bucket")
    names = sorted(os.listdir(real_clips_dir))
    assert BROKEN in names and len(names) == 4
    for name in names:
        gcs.upload_file(os.path.join(real_clips_dir, name), f"{RAW}/{name}")
    started = time.monotonic()
    counts = run_job(release_models=False, argv=[
        "--input", f"{RAW}/", "--output", OUT, "--generate-captions", "--generate-previews",
        "--model-dir", captioner_dir, "--vllm-kwargs", json.dumps(VLLM_KWARGS),
        "--captioning-window-size", str(WINDOW_SIZE), "--captioning-remainder-threshold", str(THRESHOLD),
        "--captioning-max-output-tokens", str(MAX_TOKENS),
    ])
    print(f"job on the emulator: {time.monotonic() - started:.1f} s")
    return counts, gcs.list(f"{OUT}/")


@pytest.fixture(scope="module")
def expected_windows(real_clips_dir) -> dict[tuple[str, int], tuple[int, int, float]]:
    """(source URI, window index) -> (start frame, end frame, clip fps) for every window of the good clips."""
    expected = {}
    for name in sorted(os.listdir(real_clips_dir)):
        if name == BROKEN:
            continue
        total, fps = frames_and_rate(os.path.join(real_clips_dir, name))
        for window in compute_windows(total, WINDOW_SIZE, THRESHOLD):
            expected[(f"{RAW}/{name}", window.index)] = (window.start, window.end, fps)
    return expected


@pytest.fixture(scope="module")
def rows(gcs, gcs_job):  # noqa: F811
    """Every Parquet row under ``run/captions/``, whatever the files are called."""
    _, objects = gcs_job
    tables = [o for o in objects if o.startswith(f"{OUT}/captions/") and o.endswith(".parquet")]
    assert tables
    return [row for uri in tables for row in pq.read_table(pa.BufferReader(gcs.read(uri))).to_pylist()]


def test_nothing_is_written_outside_the_output_prefix(gcs, gcs_job):  # noqa: F811
    _, objects = gcs_job
    assert objects and all(o.startswith(f"{OUT}/") for o in objects)
    assert gcs.list("gs://out-bucket/") == objects
    assert len(gcs.list(f"{RAW}/")) == 4  # the inputs are left alone


def test_a_row_with_a_caption_for_every_window(rows, expected_windows, gcs_job):
    counts, _ = gcs_job
    got = {(r["source"], r["window_index"]): (r["start_frame"], r["end_frame"]) for r in rows}
    assert len(got) == len(rows), "duplicate rows"
    assert got == {key: value[:2] for key, value in expected_windows.items()}
    assert len({r["source"] for r in rows}) == 3
    for row in rows:
        assert isinstance(row["caption"], str) and row["caption"].strip()
        assert row["clip_id"] == clip_id_for(row["source"]) and row["caption_model"] == "captioner"
        assert 0 < row["caption_num_tokens"] <= MAX_TOKENS
        assert row["caption_finish_reason"] != "length" or row["caption_num_tokens"] == MAX_TOKENS
    assert counts["windows"] == counts["captions"] == counts["previews"] == len(rows)
    assert counts["clips_found"] == 4 and counts["clips_failed"] == 1


def test_previews_are_looping_animated_webps_in_the_bucket(gcs, rows, expected_windows, gcs_job):  # noqa: F811
    _, objects = gcs_job
    previews = [o for o in objects if o.startswith(f"{OUT}/previews/")]
    assert sorted(previews) == sorted(r["preview"] for r in rows)
    for row in rows:
        uri = row["preview"]
        assert uri == f"{OUT}/previews/{row['clip_id']}/{row['start_frame']}_{row['end_frame']}.webp"
        assert gcs.exists(uri)
        start, end, fps = expected_windows[(row["source"], row["window_index"])]
        with Image.open(io.BytesIO(gcs.read(uri))) as image:
            assert image.format == "WEBP" and image.info["loop"] == 0
            assert image.n_frames == num_preview_frames(end - start + 1, fps, 1.0)
            for k in range(image.n_frames):
                image.seek(k)
                image.load()
            assert image.height == 240 or image.height == 144  # carphone_pristine.mp4 is 144 px high


def test_metas_name_the_gs_sources(gcs, gcs_job, rows):  # noqa: F811
    _, objects = gcs_job
    metas = [json.loads(gcs.read(o)) for o in objects if o.startswith(f"{OUT}/metas/") and o.endswith(".json")]
    assert sorted(m["source"] for m in metas) == sorted(
        f"{RAW}/{name}" for name in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", BROKEN)
    )
    for meta in metas:
        assert meta["clip_id"] == clip_id_for(meta["source"])
        if meta["source"].endswith(BROKEN):
            assert meta["windows"] == [] and meta["errors"][0]["stage"] == "prepare"
            continue
        windows = meta["windows"]
        assert windows and all(w["caption"] and w["preview"].startswith(f"{OUT}/previews/") for w in windows)
        assert len(windows) == sum(1 for r in rows if r["source"] == meta["source"])


def test_one_failure_record_for_the_broken_file(gcs, gcs_job):  # noqa: F811
    _, objects = gcs_job
    failures = [json.loads(gcs.read(o)) for o in objects if o.startswith(f"{OUT}/failures/")]
    assert len(failures) == 1
    (record,) = failures
    assert record["source"] == f"{RAW}/{BROKEN}" and record["stage"] == "prepare"
    assert record["error_type"] and record["message"]


def test_the_gallery_is_in_the_bucket(gcs, gcs_job, rows):  # noqa: F811
    _, objects = gcs_job
    assert f"{OUT}/index.html" in objects
    page = gcs.read(f"{OUT}/index.html").decode("utf-8")
    assert page.count('<div class="window"') == len(rows)
    assert "previews/" in page and f"{OUT}/previews" not in page  # relative links
    assert BROKEN in page and "Failures (1)" in page



def test_a_gs_clip_is_fetched_once_and_every_handle_closed(gcs, real_clips_dir, monkeypatch, tmp_path):  # noqa: F811
    """Decoding probes a clip, then decodes it: the object's bytes still cross the network once, and no
    file object or temporary copy outlives the clip, whether it decodes, fails or is abandoned part way."""
    from apache_beam.io.filesystems import FileSystems
    from gcp_storage_emulator.server import Response

    from beam_captions.media.decode import PreviewSpec
    from beam_captions.records import ClipInfo, ClipRef, Failure
    from beam_captions.transforms.prepare import PrepareConfig, prepare_clip

    gcs.create_bucket("once-bucket")
    local = os.path.join(real_clips_dir, "bigbuckbunny.mp4")
    clip, broken = "gs://once-bucket/raw/bigbuckbunny.mp4", f"gs://once-bucket/raw/{BROKEN}"
    missing = "gs://once-bucket/raw/missing.mp4"
    gcs.upload_file(local, clip)
    gcs.upload_file(os.path.join(real_clips_dir, BROKEN), broken)
    served: list[int] = []
    opened: list = []
    write_file, open_ = Response.write_file, FileSystems.open

    def counting(self, content, content_type="application/octet-stream"):
        served.append(len(content))
        return write_file(self, content, content_type)

    def recording_open(path, *args, **kwargs):
        handle = open_(path, *args, **kwargs)  # Beam >= 2.78 gives a reader for a missing object too
        opened.append((path, handle))
        return handle

    monkeypatch.setattr(Response, "write_file", counting)
    monkeypatch.setattr(FileSystems, "open", recording_open)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    config = PrepareConfig(window_size=64, remainder_threshold=32, preview=PreviewSpec(), model_frames=False)

    elements = list(prepare_clip(ClipRef.from_source(clip), config))
    assert isinstance(elements[-1], ClipInfo) and len(elements) > 2
    assert sum(served) == os.path.getsize(local), served
    (failure,) = prepare_clip(ClipRef.from_source(broken), config)
    assert isinstance(failure, Failure) and failure.stage == "prepare"
    (failure,) = prepare_clip(ClipRef.from_source(missing), config)
    assert isinstance(failure, Failure) and failure.stage == "prepare"
    abandoned = prepare_clip(ClipRef.from_source(clip), config)
    next(abandoned)
    abandoned.close()
    paths = [path for path, _ in opened]
    assert set(paths) <= {clip, broken, missing}, paths
    assert paths.count(clip) == 2 and paths.count(broken) == 1 and paths.count(missing) <= 1, paths
    assert all(handle.closed for _, handle in opened)
    assert os.listdir(tmp_path) == []
