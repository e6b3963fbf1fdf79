"""One outcome per window: a window whose caption or enhancement fails makes its clip ``failed``, with a
failure record and a summary count, and the next run tries it again. Also the user's case: a window the
real engine refuses (a prompt longer than ``max_model_len``)."""

from __future__ import annotations

import glob
import json
import os

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from clips import make_clip

from beam_captions.cli import run_job
from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.inference.enhance_handler import QwenTextEnhanceHandler
from beam_captions.metrics import counters
from beam_captions.records import ClipRef
from beam_captions.transforms import CaptionWindows, EnhanceCaptions, PrepareWindows, WriteOutputs
from beam_captions.transforms.skip_finished import SkipFinishedClips
from conftest import VLLM_KWARGS

WINDOW = 16


def _caption(engine, batch, request):
    return [r.replace(frames=None, caption=f"caption {r.window_index}", caption_model="fake") for r in batch]


def _caption_all_but_last(engine, batch, request):
    """Fault injection: the last window of every clip (index 0 of a one-window clip, 2 of a three-window one)."""
    if batch[0].window_index == _windows_of(batch[0]) - 1:
        raise ValueError("the prompt is longer than the model's context")
    return _caption(engine, batch, request)


def _windows_of(record) -> int:
    return 1 if record.source.endswith("one.mp4") else 3


def _enhance(engine, batch, request):
    return [r.replace(enhanced_caption=f"better {r.caption}", enhance_model="fake") for r in batch]


def _enhance_all_but_last(engine, batch, request):
    if batch[0].window_index == _windows_of(batch[0]) - 1:
        raise RuntimeError("the enhancer ran out of memory")
    return _enhance(engine, batch, request)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outcome-clips")
    one = make_clip(str(folder / "one.mp4"), WINDOW, 8.0, 64, 48)  # one window
    three = make_clip(str(folder / "three.mp4"), 3 * WINDOW, 8.0, 64, 48)  # three windows
    return [str(one), str(three)]


def run(clips, out, captioner_dir, caption_fn, enhance_fn=None) -> dict[str, int]:
    """The job's stages around handlers whose model call is ``caption_fn`` / ``enhance_fn`` (no engine needed)."""
    asked = {"captions": {"model": "fake"}, **({"enhancement": {"model": "fake"}} if enhance_fn else {})}
    pipeline = beam.Pipeline(options=PipelineOptions(["--direct_num_workers", "1"]))
    elements = (
        pipeline
        | beam.Create([ClipRef.from_source(c) for c in clips])
        | SkipFinishedClips(out, asked)
        | PrepareWindows(window_size=WINDOW, remainder_threshold=8, sampling_fps=4.0, model_dir=captioner_dir)
        | CaptionWindows(VideoCaptionHandler("fake-captioner", inference_fn=caption_fn, caption_batch_size=4))
    )
    if enhance_fn:
        elements = elements | EnhanceCaptions(QwenTextEnhanceHandler("fake-enhancer", inference_fn=enhance_fn))
    elements | WriteOutputs(out, asked=asked)
    result = pipeline.run()
    result.wait_until_finish()
    return counters(result)


def metas(out) -> dict[str, dict]:
    found = {}
    for path in glob.glob(os.path.join(out, "metas", "*.json")):
        with open(path) as handle:
            meta = json.load(handle)
        found[os.path.basename(meta["source"])] = meta
    return found


def failure_records(out) -> list[dict]:
    records = []
    for path in sorted(glob.glob(os.path.join(out, "failures", "*.json"))):
        with open(path) as handle:
            records.append(json.load(handle))
    return records


@pytest.mark.parametrize("stage", ["caption", "enhance"])
def test_a_failed_last_window_fails_its_clip_and_the_next_run_retries_it(clips, tmp_path, captioner_dir, stage):
    out = str(tmp_path / "out")
    if stage == "caption":
        counts = run(clips, out, captioner_dir, _caption_all_but_last)
    else:
        counts = run(clips, out, captioner_dir, _caption, _enhance_all_but_last)

    found = metas(out)
    assert {name: meta["status"] for name, meta in found.items()} == {"one.mp4": "failed", "three.mp4": "failed"}
    records = failure_records(out)
    assert sorted((os.path.basename(r["source"]), r["stage"], r["window_index"]) for r in records) == [
        ("one.mp4", stage, 0), ("three.mp4", stage, 2)]
    assert counts.get(f"failures_{stage}") == 2 and not counts.get("duplicates_dropped")
    table = pq.read_table(os.path.join(out, "captions")).to_pylist()
    assert len(table) == 4  # every window keeps its row, the failed ones too
    for meta in found.values():
        assert [e["window_index"] for e in meta["errors"]] == [len(meta["windows"]) - 1]
    if stage == "enhance":  # the failed window keeps its stage-1 caption
        assert all(row["caption"] for row in table)
        assert sorted(row["window_index"] for row in table if row["enhanced_caption"] is None) == [0, 2]

    again = run(clips, out, captioner_dir, _caption, _enhance if stage == "enhance" else None)
    assert again.get("clips_retried") == 2 and not again.get("clips_skipped")
    assert {name: meta["status"] for name, meta in metas(out).items()} == {"one.mp4": "done", "three.mp4": "done"}
    assert failure_records(out) == []
    assert not any(name.startswith("failures_") for name in again)


def test_a_window_the_real_engine_refuses_is_a_failure_and_a_later_run_captions_it(tmp_path, captioner_dir, capsys):
    """The user's case: a one-window clip whose prompt the engine refuses (longer than ``max_model_len``, 4096)."""
    clip = make_clip(str(tmp_path / "long-prompt.mp4"), 40, 10.0, 96, 64)
    out = str(tmp_path / "out")
    argv = ["--input", clip, "--output", out, "--generate-captions", "--model-dir", captioner_dir,
            "--captioning-max-output-tokens", "8", "--vllm-kwargs", json.dumps(VLLM_KWARGS), "--no-gallery"]
    too_long = ["--captioning-prompt-text", "Describe every colour and every motion you see. " * 600]
    counts = run_job([*argv, *too_long], release_models=False)
    (meta,) = metas(out).values()
    assert meta["status"] == "failed" and meta["windows"][0]["caption"] is None
    (record,) = failure_records(out)
    assert record["stage"] == "caption" and record["window_index"] == 0 and "4096" in record["message"]
    assert counts.get("failures_caption") == 1 and not counts.get("duplicates_dropped")
    summary = capsys.readouterr().out  # the summary says what is on disk
    assert "  windows          1 (0 captioned, 1 failed)" in summary and "  failures         1 (caption 1)" in summary
    assert "duplicates" not in summary

    counts = run_job([*argv, *too_long], release_models=False)  # the same command tries it again
    assert counts.get("clips_retried") == 1 and counts.get("failures_caption") == 1

    counts = run_job(argv, release_models=False)  # the default prompt fits
    (meta,) = metas(out).values()
    assert meta["status"] == "done" and meta["windows"][0]["caption"]
    assert failure_records(out) == [] and counts.get("captions") == 1
    summary = capsys.readouterr().out
    assert "  windows          1 (1 captioned, 0 failed)" in summary and "  failures         0" in summary


def test_an_element_without_a_source_version_is_never_taken_for_a_duplicate():
    """The in-bundle and keyed writes drop an element of a clip already written only when both versions are
    known and equal: a failure whose version is unknown is written, not dropped."""
    from beam_captions.records import Failure
    from beam_captions.arrival import same_delivery

    unknown = Failure("mem://a.mp4", "a", "caption", "ValueError", "refused", 0)
    assert not same_delivery((None,), unknown)
    assert not same_delivery(((10, 1.0),), unknown)
    assert same_delivery(((10, 1.0),), unknown.replace(source_version=(10, 1.0)))
    assert not same_delivery(((10, 1.0),), unknown.replace(source_version=(11, 1.0)))
