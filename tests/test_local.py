"""Local runs on every core: worker threads for decoding and previews, one engine, right counts."""

from __future__ import annotations

import glob
import json
import os
import threading

import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from clips import make_clip

import beam_captions.transforms.prepare as prepare
from beam_captions import local, progress
from beam_captions.cli import run_job
from beam_captions.inference.engine import Engine
from beam_captions.local import local_beam_args
from beam_captions.options import parse_args
from beam_captions.records import ClipInfo, WindowRecord, clip_id_for
from beam_captions.transforms.write import WriteOutputs
from conftest import VLLM_KWARGS

THREADS = ["--direct_num_workers=4", "--direct_running_mode=multi_threading"]


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(local, "available_cores", lambda: 4)


def test_a_local_batch_run_gets_a_worker_thread_per_core(four_cores):
    assert local_beam_args(["--project=p"], None, streaming=False) == ["--project=p", *THREADS]
    assert local_beam_args(["--runner=DirectRunner"], 3, streaming=False)[1:] == [
        "--direct_num_workers=3", "--direct_running_mode=multi_threading"]
    assert local_beam_args([], 1, streaming=False) == []


@pytest.mark.parametrize("args", [
    ["--direct_num_workers=1"],
    ["--direct_num_workers", "2"],
    ["--direct_running_mode=multi_processing"],
    ["--runner=DataflowRunner"],
    ["--runner", "PortableRunner"],
])
def test_beam_options_the_user_chose_and_other_runners_are_left_alone(four_cores, args):
    assert local_beam_args(args, None, streaming=False) == args
    assert local_beam_args(args, 2, streaming=False) == args


def test_streaming_is_left_to_the_direct_runners_streaming_executor(four_cores):
    assert local_beam_args([], None, streaming=True) == []


def test_local_workers_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--input", "x", "--output", "y", "--local-workers", "0"])
    assert "--local-workers must be at least 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("clips")
    for i in range(6):
        make_clip(str(folder / f"clip{i}.mp4"), 40 + 8 * i, 10.0, 96, 64)
    (folder / "broken.mp4").write_bytes(b"\x00" * 100)
    return str(folder)


def outputs(out: str) -> dict[str, object]:
    """Every file but the gallery (Parquet files as rows), with the output root replaced so two roots compare."""
    found: dict[str, object] = {}
    for path in glob.glob(os.path.join(out, "**", "*"), recursive=True):
        name = os.path.relpath(path, out)
        if name.startswith("logs"):  # the run's log, not an output
            continue
        if name.endswith(".parquet"):
            found[name] = [{k: v.replace(out, "OUT") if isinstance(v, str) else v for k, v in row.items()}
                           for row in pq.read_table(path).to_pylist()]
        elif os.path.isfile(path) and not name.endswith(".html"):
            with open(path, "rb") as handle:
                found[name] = handle.read().replace(out.encode(), b"OUT")
    return found


def test_clips_are_decoded_on_several_threads_with_the_same_outputs_and_counts(tmp_path, clips_dir, monkeypatch):
    threads: set[str] = set()
    iter_decode = prepare.iter_decode

    def recording(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return iter_decode(*args, **kwargs)

    monkeypatch.setattr(prepare, "iter_decode", recording)
    flags = ["--input", clips_dir, "--generate-previews", "--captioning-window-size", "16",
             "--captioning-remainder-threshold", "8", "--preview-target-height", "32"]
    one = run_job([*flags, "--output", str(tmp_path / "one"), "--local-workers", "1"])
    assert len(threads) == 1
    threads.clear()
    two = run_job([*flags, "--output", str(tmp_path / "two"), "--local-workers", "2"])
    assert len(threads) == 2
    assert progress.snapshot() == two  # the live progress counted every worker's work
    assert one == two and two["clips"] == 7 and two["previews"] == two["windows"] > 6
    assert outputs(str(tmp_path / "one")) == outputs(str(tmp_path / "two"))


def test_one_engine_serves_every_worker(tmp_path, real_clips_dir, captioner_dir, monkeypatch):
    decoders: set[str] = set()
    engines: set[int] = set()
    iter_decode, generate = prepare.iter_decode, Engine.generate

    def decoding(*args, **kwargs):
        decoders.add(threading.current_thread().name)
        return iter_decode(*args, **kwargs)

    def generating(self, inputs, sampling_params):
        engines.add(id(self))
        return generate(self, inputs, sampling_params)

    monkeypatch.setattr(prepare, "iter_decode", decoding)
    monkeypatch.setattr(Engine, "generate", generating)
    counts = run_job([
        "--input", real_clips_dir, "--output", str(tmp_path), "--generate-captions", "--model-dir", captioner_dir,
        "--vllm-kwargs", json.dumps(VLLM_KWARGS), "--captioning-window-size", "64",
        "--captioning-remainder-threshold", "32", "--captioning-max-output-tokens", "8", "--local-workers", "2",
    ], release_models=False)
    assert counts["captions"] == counts["windows"] >= 6
    assert len(decoders) == 2 and len(engines) == 1


def test_a_clip_whose_elements_span_bundles_is_completed_by_the_keyed_write(tmp_path):
    source = "/videos/split.mp4"
    clip_id = clip_id_for(source)
    windows = [WindowRecord(clip_id, source, i, i * 10, i * 10 + 9, i, i + 1.0, (i * 10,), caption=f"w{i}")
               for i in range(3)]
    info = ClipInfo(clip_id, source, 64, 48, 10.0, 30, "h264", 3.0, 3)
    stream = TestStream().add_elements(windows[:2]).add_elements([info]).add_elements(windows[2:])
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as pipeline:
        pipeline | stream | WriteOutputs(str(tmp_path))
    meta = json.loads((tmp_path / "metas" / f"{clip_id}.json").read_text())
    assert [w["caption"] for w in meta["windows"]] == ["w0", "w1", "w2"] and meta["errors"] == []
    assert not (tmp_path / "failures").exists()


PREVIEWS_ONLY_MODULES = """
import sys
from beam_captions.cli import run_job
run_job(["--input", sys.argv[1], "--output", sys.argv[2], "--generate-previews", "--no-gallery"])
print(sorted(name for name in ("torch", "vllm", "apache_beam.ml") if name in sys.modules))
"""


def test_a_previews_only_job_loads_no_model_library(tmp_path):
    """Its start-up stays short (P7): no torch for the GPU memory check, no caption stage's imports."""
    import subprocess
    import sys

    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(clips / "a.mp4", 12, 24, 64, 48)
    done = subprocess.run([sys.executable, "-c", PREVIEWS_ONLY_MODULES, str(clips), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
    assert glob.glob(str(tmp_path / "out" / "previews" / "**" / "*.webp"), recursive=True)


# The local runner (issue 31): Beam's DirectRunner with Prism off, named in the log; Prism only when asked.

def _log_of(out) -> str:
    [path] = glob.glob(os.path.join(str(out), "logs", "*.log"))
    with open(path) as handle:
        return handle.read()


@pytest.mark.parametrize("runner", [[], ["--runner", "DirectRunner"]])
def test_a_local_run_runs_on_the_fn_api_runner_and_never_tries_prism(tmp_path, runner):
    from test_run_details import previews_args

    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(str(clips / "a.mp4"), 24, 10.0, 96, 64)
    out = tmp_path / "out"
    counts = run_job(previews_args(str(clips), str(out), *runner))
    assert counts["previews"] == 2
    log = _log_of(out)
    assert [line.split(": ", 1)[1] for line in log.splitlines() if "local runner:" in line] == [
        "local runner: FnApiRunner (Prism off)"]
    assert "PrismRunner" not in log and "downloading prism" not in log.lower()


@pytest.mark.parametrize("source, expected", [
    (["--input", "IN"], "FnApiRunner"),
    (["--streaming", "--input", "IN"], "FnApiRunner"),
    (["--streaming", "--input-subscription", "projects/my-project/subscriptions/raw-clips"], "BundleBasedDirectRunner"),
])
def test_the_local_runner_chooses_as_beams_direct_runner_does_without_prism(tmp_path, source, expected):
    """Beam 2.78's DirectRunner: the FnApiRunner, unless the job reads Pub/Sub (BundleBasedDirectRunner)."""
    import apache_beam as beam

    from beam_captions.pipeline import build_pipeline

    config, beam_args = parse_args([arg.replace("IN", str(tmp_path)) for arg in source]
                                   + ["--output", str(tmp_path / "out"), "--generate-previews"])
    options = PipelineOptions(beam_args + (["--streaming"] if config.streaming else []))
    runner = local.local_runner(options)
    pipeline = beam.Pipeline(runner=runner, options=options)
    build_pipeline(pipeline, config)
    assert type(runner.choose(pipeline, options)).__name__ == expected


def test_prism_runs_only_when_asked_for():
    import apache_beam as beam

    assert local.local_runner(PipelineOptions(["--runner", "PrismRunner"])) is None
    assert type(beam.Pipeline(options=PipelineOptions(["--runner", "PrismRunner"])).runner).__name__ == "PrismRunner"
    for args in ([], ["--runner=DirectRunner"], ["--runner", "direct"]):
        assert type(local.local_runner(PipelineOptions(args))).__name__ == "SwitchingDirectRunner"
