"""The whole job with each Nemotron family on the CPU: tiny random models, real clips, vLLM's real model class.

One engine per family for the whole suite: each family's job runs once (module-scoped) and its engine
is released before the next family's loads.
"""

from __future__ import annotations

import glob
import json
import os

import pyarrow.parquet as pq
import pytest

from beam_captions.cli import run_job
from beam_captions.inference.frame_bounds import model_frame_bounds
from conftest import VLLM_KWARGS

FAMILIES = {
    # variant: (tiny model, --vllm-kwargs). The VL run names enable_prefix_caching itself; the Omni
    # run leaves it to the family (off automatically without a GPU).
    "nemotron": ("captioner-nemotron", {**VLLM_KWARGS, "enable_prefix_caching": False}),
    "nemotron-3-nano-omni": ("captioner-nemotron-omni", VLLM_KWARGS),
}
MAX_TOKENS = 16


@pytest.fixture(scope="module", params=list(FAMILIES))
def job(request, tmp_path_factory, nemotron_models, real_clips_dir):
    variant = request.param
    name, vllm_kwargs = FAMILIES[variant]
    out = str(tmp_path_factory.mktemp(f"out-{variant}"))
    argv = [
        "--input", real_clips_dir, "--output", out, "--generate-captions",
        "--captioning-algorithm", variant, "--model-dir", nemotron_models[name],
        "--captioning-max-output-tokens", str(MAX_TOKENS), "--captioning-batch-size", "4",
        # One window a clip, at most 10 frames: 256 tokens a frame (VL) stays inside max_model_len 4096.
        "--captioning-sampling-fps", "1.0",
        "--vllm-kwargs", json.dumps(vllm_kwargs),
    ]
    if variant == "nemotron":
        argv.append("--captioning-stage2-caption")
    counts = run_job(argv, release_models=True)  # one engine at a time
    rows = pq.read_table(os.path.join(out, "captions")).to_pylist()
    metas = {m["source"]: m for m in (json.load(open(p)) for p in glob.glob(os.path.join(out, "metas", "*.json")))}
    return variant, name, nemotron_models[name], counts, rows, metas


def test_every_window_of_the_real_clips_gets_a_caption(job):
    variant, name, _, counts, rows, _ = job
    assert len({r["source"] for r in rows}) == 3 and len(rows) >= 3
    for row in rows:
        assert isinstance(row["caption"], str) and row["caption"].strip(), row
        assert "<think>" not in row["caption"] and "</think>" not in row["caption"]
        assert row["caption_model"] == name
        assert 0 < row["caption_num_tokens"] <= MAX_TOKENS
        if variant == "nemotron":
            assert isinstance(row["caption_stage2"], str) and row["caption_stage2"].strip()
    assert counts["captions"] == counts["windows"] == len(rows)
    assert counts["clips_failed"] == 1 and counts["failures_prepare"] == 1  # the broken file only


def test_prompt_tokens_are_the_frames_the_prepare_step_sized(job):
    """vLLM counted exactly the video tokens of frames at the size the prepare step gave them, plus text."""
    _, _, model_dir, counts, rows, metas = job
    sizing = model_frame_bounds(model_dir, job[0])
    for row in rows:
        meta = metas[row["source"]]
        video_tokens = row["num_sampled_frames"] * sizing.tokens_per_frame(meta["width"], meta["height"])
        text_per_frame = 40  # "Frame 3 sampled at 1.50 seconds: <img>...</img>" in the tiny byte-level BPE
        assert video_tokens < row["caption_prompt_tokens"] < video_tokens + text_per_frame * row["num_sampled_frames"] + 200
    assert counts["caption_prompt_tokens"] == sum(r["caption_prompt_tokens"] for r in rows)
