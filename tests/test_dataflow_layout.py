"""``--dataflow-layout``: which steps carry the ``--accelerator`` hint (so which Dataflow workers run them),
and that a local run with the hint writes the same under either layout.

The Dataflow job graph of each layout, built for the DataflowRunner itself, is checked in ``test_runners.py``.
"""

from __future__ import annotations

import json
import shutil

import apache_beam as beam
import pytest

from beam_captions.cli import run_job
from beam_captions.options import parse_args
from beam_captions.pipeline import build_pipeline
from beam_captions.samples import sample_clip_paths
from conftest import VLLM_KWARGS
from test_runners import ACCELERATOR, ACCELERATOR_URN, outputs

MODEL_STEPS = {"CaptionWindows", "WriteOutputs"}  # the model step and the writes as a clip is captioned
DECODE_STEPS = {"PrepareWindows", "GeneratePreviews"}


def hints_by_step(argv: list[str]) -> dict[str, bytes]:
    """The accelerator hint (b"" where none) of every primitive step of the job ``argv`` describes."""
    config, _ = parse_args(argv)
    pipeline = beam.Pipeline()
    build_pipeline(pipeline, config)
    proto = pipeline.to_runner_api()
    envs = proto.components.environments
    return {t.unique_name: envs[t.environment_id].resource_hints.get(ACCELERATOR_URN, b"")
            for t in proto.components.transforms.values() if t.environment_id and not t.subtransforms}


def job_argv(out: str, captioner: str, *extra: str) -> list[str]:
    return ["--input", sample_clip_paths()["carphone_pristine.mp4"], "--output", out, "--generate-previews",
            "--generate-captions", "--model-dir", captioner, *extra]


@pytest.mark.parametrize("layout, gpu_steps", [
    (None, MODEL_STEPS | DECODE_STEPS),  # the default is fused
    ("fused", MODEL_STEPS | DECODE_STEPS),
    ("right-fitted", MODEL_STEPS),
])
def test_the_layout_decides_whether_decoding_shares_the_gpu_steps_hint(tmp_path, captioner_dir, layout, gpu_steps):
    extra = ["--accelerator", ACCELERATOR] + (["--dataflow-layout", layout] if layout else [])
    hints = hints_by_step(job_argv(str(tmp_path), captioner_dir, *extra))
    on_gpu = {name for name, hint in hints.items() if hint}
    assert {name.split("/")[0] for name in on_gpu} == gpu_steps
    assert {hints[name] for name in on_gpu} == {ACCELERATOR.encode()}
    # every step of a hinted stage: decoding never splits across worker kinds
    for name, hint in hints.items():
        if name.split("/")[0] in DECODE_STEPS:
            assert bool(hint) == (DECODE_STEPS <= gpu_steps), name
    # listing and the keyed fallback write stay on CPU workers: only clip references cross to a fused GPU stage
    assert not any(hints[name] for name in hints if name.startswith(("ReadClips/", "SkipFinished/")))
    assert not any(hints[name] for name in hints if name.startswith("WriteOutputs/WriteWhenComplete"))


@pytest.mark.parametrize("layout", ["fused", "right-fitted"])
def test_without_a_model_or_an_accelerator_nothing_is_hinted(tmp_path, captioner_dir, layout):
    previews_only = ["--input", "x.mp4", "--output", str(tmp_path), "--generate-previews", "--accelerator", ACCELERATOR,
                     "--dataflow-layout", layout]
    assert not any(hints_by_step(previews_only).values())
    assert not any(hints_by_step(job_argv(str(tmp_path), captioner_dir, "--dataflow-layout", layout)).values())


def test_a_local_run_with_the_hint_writes_the_same_under_either_layout(tmp_path, captioner_dir):
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(sample_clip_paths()["carphone_pristine.mp4"], clips)
    found = {}
    for layout in ("fused", "right-fitted"):
        out = str(tmp_path / layout)
        argv = job_argv(out, captioner_dir, "--accelerator", ACCELERATOR, "--dataflow-layout", layout,
                        "--captioning-max-output-tokens", "8", "--vllm-kwargs", json.dumps(VLLM_KWARGS))
        argv[1] = str(clips)
        counts = run_job(argv, release_models=False)
        found[layout] = outputs(out)
        assert counts.get("captions") == len(found[layout]["rows"]) >= 1
    assert found["fused"] == found["right-fitted"]
    assert len(found["fused"]["previews"]) == len(found["fused"]["rows"])
