"""The whole job on the DirectRunner with the real vLLM engine, the tiny captioner and real clips."""

from __future__ import annotations

import glob
import json
import os

import av
import pyarrow.parquet as pq
import pytest

from beam_captions.cli import run_job
from beam_captions.media.windowing import compute_windows, num_sampled_frames
from beam_captions.records import clip_id_for
from conftest import VLLM_KWARGS

WINDOW_SIZE, THRESHOLD = 64, 32


def decoded_frames_and_rate(path: str) -> tuple[int, float]:
    """Count frames by decoding every one (independently of the pipeline's own counting)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), float(stream.average_rate)


def job_argv(out, tiny_models, captioner_dir, real_clips_dir) -> list[str]:
    return [
        "--input", real_clips_dir, "--output", out, "--generate-captions", "--model-dir", captioner_dir,
        "--captioning-window-size", str(WINDOW_SIZE), "--captioning-remainder-threshold", str(THRESHOLD),
        "--captioning-max-output-tokens", "24", "--captioning-batch-size", "4", "--captioning-stage2-caption",
        "--enhance-captions", "--enhance-captions-model-dir", tiny_models["enhancer"],
        "--enhance-captions-max-output-tokens", "16",
        "--vllm-kwargs", json.dumps(VLLM_KWARGS),
    ]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models, captioner_dir, real_clips_dir):
    out = str(tmp_path_factory.mktemp("out"))
    counts = run_job(job_argv(out, tiny_models, captioner_dir, real_clips_dir), release_models=False)
    rows = pq.read_table(os.path.join(out, "captions")).to_pylist()
    return out, counts, rows


def test_rows_are_exactly_the_expected_windows(job, real_clips_dir):
    _, _, rows = job
    expected = set()
    for path in sorted(glob.glob(os.path.join(real_clips_dir, "*.mp4"))):
        if path.endswith("not-a-video.mp4"):
            continue
        total, fps = decoded_frames_and_rate(path)
        for window in compute_windows(total, WINDOW_SIZE, THRESHOLD):
            expected.add((path, window.index, window.start, window.end, num_sampled_frames(window.num_frames, fps, 2.0)))
    got = {(r["source"], r["window_index"], r["start_frame"], r["end_frame"], r["num_sampled_frames"]) for r in rows}
    assert len(rows) == len(got), "duplicate rows"
    assert got == expected
    assert len({r["source"] for r in rows}) == 3 and len(rows) >= 6


def test_every_window_has_stage1_stage2_and_enhanced_captions(job):
    _, _, rows = job
    for row in rows:
        assert isinstance(row["caption"], str) and row["caption"].strip()
        assert isinstance(row["caption_stage2"], str) and row["caption_stage2"].strip()
        assert row["caption_model"] == "captioner" and row["prompt_variant"] == "default"
        assert row["clip_id"] == clip_id_for(row["source"])
        assert isinstance(row["enhanced_caption"], str) and row["enhanced_caption"].strip()
        assert row["enhance_model"] == "enhancer" and row["preview"] is None
        assert 0 <= row["start_s"] < row["end_s"]


def test_broken_file_gives_a_failure_record_and_the_summary_counts_it(job, real_clips_dir):
    out, counts, _ = job
    records = [json.load(open(p)) for p in glob.glob(os.path.join(out, "failures", "*.json"))]
    assert len(records) == 1
    (record,) = records
    assert record["source"].endswith("not-a-video.mp4") and record["stage"] == "prepare"
    assert record["error_type"] and record["message"]
    assert counts["clips_found"] == 4 and counts["clips_failed"] == 1 and counts["failures_prepare"] == 1
    assert counts["captions"] == counts["windows"]


def test_metas_describe_each_clip(job):
    out, _, rows = job
    metas = {m["source"]: m for m in (json.load(open(p)) for p in glob.glob(os.path.join(out, "metas", "*.json")))}
    assert len(metas) == 4
    bunny = next(m for s, m in metas.items() if s.endswith("bigbuckbunny.mp4"))
    assert (bunny["width"], bunny["height"], bunny["codec"]) == (1280, 720, "h264")
    assert [w["window_index"] for w in bunny["windows"]] == list(range(len(bunny["windows"])))
    assert all(w["caption"] for w in bunny["windows"])
    broken = next(m for s, m in metas.items() if s.endswith("not-a-video.mp4"))
    assert broken["width"] is None and broken["windows"] == [] and broken["errors"][0]["stage"] == "prepare"


def test_sanity_columns_are_filled_and_counted(job):
    out, counts, rows = job
    truncated = 0
    for row in rows:
        # The tiny models stop at varied lengths: a caption is cut (flagged) exactly when it hit the limit.
        for kind, limit in (("caption", 24), ("caption_stage2", 24), ("enhanced_caption", 16)):
            tokens, reason, flags = (row[f"{kind}_num_tokens"], row[f"{kind}_finish_reason"], row[f"{kind}_flags"])
            assert 0 < tokens <= limit and reason in ("stop", "length")
            assert ("truncated" in flags) == (reason == "length")
            assert tokens == limit if reason == "length" else tokens <= limit
            assert row[f"{kind}_sound"] is (not flags)
            truncated += "truncated" in flags
        assert row["caption_retried"] is False
        assert row["caption_prompt_tokens"] > 4 * row["num_sampled_frames"] // 2  # text + >= 4 tokens a frame pair
    assert truncated > 0 and counts.get("flagged_truncated", 0) == truncated
    assert counts["caption_prompt_tokens"] == sum(row["caption_prompt_tokens"] for row in rows)
    cut = next(row for row in rows if "truncated" in row["caption_flags"])
    meta = json.load(open(glob.glob(os.path.join(out, "metas", cut["clip_id"] + ".json"))[0]))
    window = next(w for w in meta["windows"] if w["window_index"] == cut["window_index"])
    assert "truncated" in window["caption_flags"] and window["caption_prompt_tokens"] == cut["caption_prompt_tokens"]


def test_the_gallery_is_written_with_every_clip(job):
    out, _, rows = job
    page = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    assert page.count('<div class="window"') == len(rows)
    assert all(f'id="{r["clip_id"]}-{r["window_index"]}"' in page for r in rows)
    assert "not-a-video.mp4" in page and "Failures (1)" in page


def test_a_rerun_over_finished_clips_loads_no_model(job, tiny_models, captioner_dir, real_clips_dir, monkeypatch):
    import vllm

    from beam_captions.inference import engine

    out, _, rows = job

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although every clip was done")

    monkeypatch.setattr(engine, "_engines", {})
    monkeypatch.setattr(vllm.AsyncLLMEngine, "from_engine_args", refuse)
    counts = run_job(job_argv(out, tiny_models, captioner_dir, real_clips_dir) + ["--no-retry-failed"],
                     release_models=False)
    assert counts["clips_skipped"] == 4 and counts.get("windows", 0) == 0
    assert pq.read_table(os.path.join(out, "captions")).num_rows == len(rows)
