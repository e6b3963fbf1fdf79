"""Previews: a previews-only job on real clips, every WebP decoded with Pillow; encoding failures isolated."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_captions.cli import run_job
from beam_captions.io.paths import previews_dir
from beam_captions.media.windowing import num_preview_frames
from beam_captions.records import WindowRecord
from beam_captions.transforms.previews import preview_window
from test_pipeline_e2e import decoded_frames_and_rate

TARGET_FPS, TARGET_HEIGHT = 2.0, 160  # carphone_pristine.mp4 is 144 px high


@pytest.fixture(scope="module")
def preview_job(tmp_path_factory, real_clips_dir):
    out = str(tmp_path_factory.mktemp("previews"))
    counts = run_job([
        "--input", real_clips_dir, "--output", out, "--generate-previews", "--captioning-window-size", "64",
        "--captioning-remainder-threshold", "32", "--preview-target-fps", str(TARGET_FPS),
        "--preview-target-height", str(TARGET_HEIGHT), "--preview-quality", "60",
    ])
    return out, counts, pq.read_table(os.path.join(out, "captions")).to_pylist()


def test_every_window_has_a_decodable_looping_animated_webp(preview_job):
    out, counts, rows = preview_job
    assert rows and counts["previews"] == len(rows) == len(glob.glob(os.path.join(previews_dir(out), "*", "*.webp")))
    rates = {}
    for row in rows:
        if row["source"] not in rates:
            rates[row["source"]] = decoded_frames_and_rate(row["source"])[1]
        expected = f"{previews_dir(out)}/{row['clip_id']}/{row['start_frame']}_{row['end_frame']}.webp"
        assert row["preview"] == expected and row["caption"] is None
        frames = num_preview_frames(row["end_frame"] - row["start_frame"] + 1, rates[row["source"]], TARGET_FPS)
        with Image.open(row["preview"]) as image:
            assert image.format == "WEBP" and image.height == TARGET_HEIGHT and image.width % 2 == 0
            assert image.n_frames == frames and image.info["loop"] == 0
            assert image.is_animated == (frames > 1)
            image.load()
            assert image.info["duration"] == pytest.approx(1000 / TARGET_FPS, abs=2)


def test_small_sources_are_warned_about_once_per_clip(preview_job):
    out, _, _ = preview_job
    metas = [json.load(open(p)) for p in glob.glob(os.path.join(out, "metas", "*.json"))]
    carphone = next(m for m in metas if m["source"].endswith("carphone_pristine.mp4"))
    assert carphone["warnings"] == [f"source height 144px is below the preview target {TARGET_HEIGHT}px"]
    assert all(m["warnings"] == [] for m in metas if m is not carphone)


def record_with_previews(previews: np.ndarray) -> WindowRecord:
    return WindowRecord("c", "s.mp4", 0, 0, 9, 0.0, 1.0, (0, 9), caption="kept caption", preview_frames=previews, preview_fps=1.0)


def test_an_encoding_failure_skips_only_that_preview():
    bad = np.zeros((2, 5, 3), np.uint8)  # not N x H x W x 3
    (record,) = preview_window(record_with_previews(bad), quality=50, compression_level=6, threads=1)
    (failure,) = record.failures  # one element: the window, carrying its failure
    assert failure.stage == "preview" and failure.error_type == "PreviewEncodeError" and failure.window_index == 0
    assert record.caption == "kept caption" and record.preview_webp is None and record.preview_frames is None


def test_quality_and_compression_level_change_the_file():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 120, 160, 3), np.uint8)
    sizes = {}
    for quality, level in ((10, 6), (90, 6), (90, 0)):
        (record,) = preview_window(record_with_previews(frames), quality=quality, compression_level=level, threads=1)
        sizes[quality, level] = record.preview_webp
    assert len(sizes[10, 6]) < len(sizes[90, 6])
    assert sizes[90, 6] != sizes[90, 0]
