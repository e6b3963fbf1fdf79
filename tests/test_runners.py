"""The job beyond the in-memory DirectRunner: Dataflow (offline), its Flex Template files, and Flink's path.

* Dataflow: the job graph is built for the DataflowRunner without submitting it (``--dry_run``, or the Flex
  Template launcher's ``--template_location``) against an in-process GCS emulator: the accelerator resource
  hint is on the model steps, the writes right after them and, under ``--dataflow-layout fused``, decoding.
* Flex Template: ``metadata.json`` is generated from the CLI, gcloud accepts it, template parameters become
  the same job config, ``launch.sh`` quotes what it hands gcloud.
* Flink: Beam's Python job service with an EXTERNAL worker pool (started by ``templates/flink/start_worker_pool.sh``)
  runs the real job through the portable path a Flink cluster executes; it must write what the in-memory
  DirectRunner writes. So must the multi-process DirectRunner (everything pickled between processes).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import FlinkRunnerOptions, PipelineOptions, PortableOptions
from apache_beam.portability.api import beam_runner_api_pb2

from beam_captions.cli import compact, run_job
from beam_captions.options import build_parser, parse_args
from beam_captions.pipeline import build_pipeline
from conftest import VLLM_KWARGS
import services
from gcs import storage_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATAFLOW_DIR = os.path.join(ROOT, "templates", "dataflow")
FLINK_DIR = os.path.join(ROOT, "templates", "flink")


def _load(name: str):
    """A script of templates/dataflow as a module (that folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"dataflow_template_{name}", os.path.join(DATAFLOW_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flex_main = _load("flex_main")
make_metadata = _load("make_metadata")

ACCELERATOR_URN = "beam:resources:accelerator:v1"
ACCELERATOR = "type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver:5xx"
IMAGE = "us-docker.pkg.dev/test-project/beam-captions/beam-captions:test"
# A valid bucket name: for an invalid one ("b" is too short) Beam ignores temp_location and tries to
# create a default bucket instead.
BUCKET = "beam-captions-test"


# ---------------------------------------------------------------------------------------------------
# Dataflow: the job graph, offline


@pytest.fixture(scope="module")
def bucket():
    """gs://BUCKET on an in-process GCS emulator (tests/gcs.py); Beam connects to it anonymously."""
    with storage_emulator(BUCKET):
        yield f"gs://{BUCKET}"


def dataflow_args(bucket: str, **extra) -> list[str]:
    args = [
        "--runner=DataflowRunner", "--project=test-project", "--region=us-central1", "--no_auth",
        f"--temp_location={bucket}/tmp", f"--staging_location={bucket}/staging",
        f"--sdk_container_image={IMAGE}", "--sdk_location=container",
    ]
    return args + [f"--{name}={value}" for name, value in extra.items()]


def full_job_args(bucket: str, tiny_models: dict, accelerator: str | None = ACCELERATOR) -> list[str]:
    args = [
        "--input", f"{bucket}/raw/", "--output", f"{bucket}/out",
        "--generate-captions", "--model-dir", tiny_models["captioner"], "--generate-previews",
        "--enhance-captions", "--enhance-captions-model-dir", tiny_models["enhancer"],
    ]
    return args + (["--accelerator", accelerator] if accelerator else [])


def dry_run_graph(argv: list[str]):
    """The pipeline proto the DataflowRunner would submit, and the options of that job."""
    config, beam_args = parse_args(argv)
    pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(pipeline, config)
    result = pipeline.run()
    return result.job.proto_pipeline, result.job.options


def is_inference(name: str) -> bool:
    return "ServeModel" in name.split("/")


def leaf_environments(proto) -> dict[str, beam_runner_api_pb2.Environment]:
    """Environment of every primitive transform that runs user code, by transform name."""
    envs = proto.components.environments
    return {
        t.unique_name: envs[t.environment_id]
        for t in proto.components.transforms.values()
        if t.environment_id and not t.subtransforms
    }


def writes_as_captioned(name: str) -> bool:
    """The steps that write a clip as its last window leaves the model (they share the model's stage)."""
    return name.split("/")[:2] in (["WriteOutputs", "WritePreviews"], ["WriteOutputs", "WriteCompleteInBundle"])


def decodes(name: str) -> bool:
    return name.split("/")[0] in ("PrepareWindows", "GeneratePreviews")


def assert_gpu_steps(proto, accelerator: str, streaming: bool = False, layout: str = "fused") -> None:
    """GPUs on the model steps and on the writes that make each clip durable as it is captioned (same
    hints, so Dataflow fuses them into the GPU stage), and in the fused layout (the default) on decoding
    and previews too; listing and the keyed write on CPU."""
    leaves = leaf_environments(proto)
    gpu = {name for name, env in leaves.items() if ACCELERATOR_URN in env.resource_hints}
    inference = {name for name in leaves if is_inference(name)}
    fused = layout == "fused"
    assert gpu == inference | {name for name in leaves if writes_as_captioned(name) or (fused and decodes(name))}
    assert any(n.startswith("CaptionWindows/") for n in gpu)
    assert any(n.startswith("WriteOutputs/WriteCompleteInBundle") for n in gpu)
    assert len({leaves[name].SerializeToString() for name in gpu}) == 1, "GPU steps in different environments"
    for name in gpu:
        assert leaves[name].resource_hints[ACCELERATOR_URN] == accelerator.encode()
    cpu = set(leaves) - gpu
    read_step = ("WatchClips/", "ClipsFromNotifications/") if streaming else ("ReadClips/",)
    for step in (read_step, "WriteOutputs/WriteWhenComplete"):
        assert any(n.startswith(step) for n in cpu), f"no {step} step on CPU workers"
    for step in ("PrepareWindows/", "GeneratePreviews/"):
        assert any(n.startswith(step) for n in (gpu if fused else cpu)), f"no {step} step where the layout puts it"
    for env in leaves.values():  # every step runs the custom image, GPU or not
        assert env.urn == "beam:env:docker:v1"
        assert beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image == IMAGE


@pytest.mark.parametrize("mode, layout", [("batch", "fused"), ("streaming", "fused"), ("batch", "right-fitted")])
def test_dataflow_graph_gives_the_accelerator_to_the_model_steps_and_the_writes_after_them(
    bucket, tiny_models, mode, layout
):
    proto, options = dry_run_graph(
        full_job_args(bucket, tiny_models) + ["--dataflow-layout", layout] + dataflow_args(bucket, dry_run=True)
        + (["--streaming", "--streaming"] if mode == "streaming" else [])  # the CLI's flag, then Beam's
    )
    assert_gpu_steps(proto, ACCELERATOR, streaming=mode == "streaming", layout=layout)
    assert any(n.startswith("EnhanceCaptions/") for n in leaf_environments(proto) if is_inference(n))
    cloud = options.get_all_options()
    # Right fitting asks for GPUs per step; the job-wide worker_accelerator option must stay unset.
    assert not any("worker_accelerator" in o for o in cloud.get("dataflow_service_options") or [])
    assert cloud["sdk_container_image"] == IMAGE and cloud["sdk_location"] == "container"
    assert bool(cloud.get("streaming")) == (mode == "streaming")


def test_dataflow_graph_without_accelerator_has_one_environment_without_hints(bucket, tiny_models):
    proto, _ = dry_run_graph(full_job_args(bucket, tiny_models, accelerator=None) + dataflow_args(bucket, dry_run=True))
    envs = {env.SerializeToString(): env for env in leaf_environments(proto).values()}
    assert len(envs) == 1
    (env,) = envs.values()
    assert not env.resource_hints


def test_flex_template_launch_writes_a_job_with_gpus_on_the_inference_steps(bucket, tiny_models, tmp_path):
    """What the Flex Template launcher runs: flex_main.py with the template's parameters and Dataflow's options."""
    job_file = tmp_path / "job_object.json"
    launcher_argv = [
        f"--input={bucket}/raw/", f"--output={bucket}/out", "--generate_captions=true",
        f"--model_dir={tiny_models['captioner']}", "--generate_previews=true", "--enhance_captions=false",
        f"--accelerator={ACCELERATOR}", "--captioning_window_size=128",
        "--runner=DataflowRunner", "--project=test-project", "--region=us-central1",
        f"--temp_location={bucket}/tmp", f"--staging_location={bucket}/staging", f"--sdk_container_image={IMAGE}",
        f"--template_location={job_file}",
    ]
    flex_main.main(launcher_argv)

    job = json.loads(job_file.read_text())
    environment = job["environment"]
    (pool,) = environment["workerPools"]
    images = {i["environmentId"]: i["containerImage"] for i in pool["sdkHarnessContainerImages"]}
    assert len(images) == 2 and set(images.values()) == {IMAGE}  # a CPU and a GPU environment, one image
    options = environment["sdkPipelineOptions"]["options"]  # Beam's options only: the CLI's stay in the launcher
    assert options["sdk_location"] == "container" and options["sdk_container_image"] == IMAGE
    assert "accelerator" not in options and "generate_captions" not in options
    # The pipeline itself was staged to (emulated) Cloud Storage, as Dataflow will read it.
    with FileSystems.open(options["pipelineUrl"]) as handle:
        proto = beam_runner_api_pb2.Pipeline.FromString(handle.read())
    assert_gpu_steps(proto, ACCELERATOR)  # the template's default layout: fused
    assert set(images) == {t.environment_id for t in proto.components.transforms.values() if t.environment_id}


def test_run_job_dry_run_on_dataflow_returns_without_a_gallery(bucket, tiny_models):
    run_job(full_job_args(bucket, tiny_models) + dataflow_args(bucket, dry_run=True))
    assert not FileSystems.exists(f"{bucket}/out/index.html")


def test_compact_builds_a_dataflow_job_without_running_it(bucket, capsys):
    assert compact([f"{bucket}/out", *dataflow_args(bucket, dry_run=True)]) == {}
    assert "handed to DataflowRunner" in capsys.readouterr().out
    assert not FileSystems.exists(f"{bucket}/out/captions/_manifest.json")


# ---------------------------------------------------------------------------------------------------
# Flex Template files


def test_metadata_json_is_the_generated_one():
    with open(make_metadata.METADATA_PATH, encoding="utf-8") as handle:
        assert handle.read() == make_metadata.render(make_metadata.build_metadata()), (
            "templates/dataflow/metadata.json is stale: run python templates/dataflow/make_metadata.py"
        )


def test_every_cli_flag_is_a_template_parameter_with_help_and_validation():
    flags = make_metadata.cli_flags()
    params = {p["name"]: p for p in make_metadata.build_metadata()["parameters"]}
    assert list(params) == [a.dest for a in flags] and len(flags) >= 20
    for action in flags:
        param = params[action.dest]
        assert param["label"] and param["helpText"].strip(), action.dest
        assert action.option_strings[0] in param["helpText"]
        assert param["isOptional"] == (not action.required)
        regexes = [re.compile(r) for r in param.get("regexes", [])]
        default = param.get("defaultValue")
        if default is not None and regexes:
            assert all(r.fullmatch(default) for r in regexes), (action.dest, default)
        needs_regex = (
            action.type in (int, float) or action.choices or action.nargs == 0
            or action.dest in ("input", "output", "accelerator")
            or action.dest.endswith(("model_dir", "vllm_kwargs"))
        )
        if needs_regex:
            assert regexes, f"{action.dest} has no validation regex"

    def valid(name: str, value: str) -> bool:
        return all(re.fullmatch(r, value) for r in params[name]["regexes"])

    assert valid("input", "gs://b/raw/") and not valid("input", "/local/raw")
    assert valid("generate_captions", "true") and not valid("generate_captions", "yes")
    assert valid("captioning_window_size", "256") and not valid("captioning_window_size", "2.5")
    assert valid("captioning_sampling_fps", "0.5") and not valid("captioning_sampling_fps", "fast")
    assert valid("captioning_algorithm", "qwen3") and not valid("captioning_algorithm", "llava")
    assert valid("accelerator", ACCELERATOR) and valid("accelerator", "type:nvidia-tesla-t4;count:2")
    assert not valid("accelerator", "nvidia-l4") and not valid("model_dir", "models/captioner")
    assert valid("vllm_kwargs", '{"max_model_len": 8192}') and not valid("vllm_kwargs", "[1]")


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud is not installed")
def test_gcloud_accepts_the_metadata_file(tmp_path):
    done = subprocess.run(
        ["gcloud", "dataflow", "flex-template", "build", f"gs://{BUCKET}/templates/t.json", f"--image={IMAGE}",
         "--sdk-language=PYTHON", f"--metadata-file={make_metadata.METADATA_PATH}", "--print-only",
         "--project=test-project"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path)),
    )
    assert done.returncode == 0, done.stderr
    spec = json.loads(done.stdout[done.stdout.index("{"):])
    with open(make_metadata.METADATA_PATH, encoding="utf-8") as handle:
        assert spec["metadata"] == json.load(handle)  # nothing dropped or renamed by the API's schema
    assert spec["sdkInfo"] == {"language": "PYTHON"}


def test_template_parameters_give_the_same_job_config_as_the_cli(tiny_models):
    values = {
        "input": "gs://b/raw/", "output": "gs://b/out", "model_dir": tiny_models["captioner"],
        "enhance_captions_model_dir": tiny_models["enhancer"], "captioning_prompt_text": "Say what happens, then stop.",
        "captioning_gpu_memory_share": "0.35", "enhance_captions_gpu_memory_share": "0.55",
        "vllm_kwargs": '{"max_model_len": 4096, "enforce_eager": true}', "accelerator": ACCELERATOR,
        "captioning_window_size": "64", "captioning_remainder_threshold": "32",
    }
    launcher, cli = [], []
    for param, action in zip(make_metadata.build_metadata()["parameters"], make_metadata.cli_flags()):
        name = param["name"]
        if param["paramType"] == "BOOLEAN":
            launcher.append(f"--{name}=true")
            cli.append(action.option_strings[0])
            continue
        value = values.get(name, param.get("defaultValue"))
        if value in (None, "-"):
            continue
        launcher.append(f"--{name}={value}")
        cli += [action.option_strings[0], value]
    beam_options = ["--runner=DataflowRunner", "--project=p", "--experiments=a,b"]
    translated = flex_main.to_cli_args(launcher + beam_options)
    config, beam_args = parse_args(translated)
    assert config == parse_args(cli)[0]
    assert config.generate_captions and config.enhance_captions and config.vllm_kwargs["enforce_eager"] is True
    assert beam_args == beam_options + ["--sdk_location=container"]


def test_template_switches_take_true_or_false_only():
    parser = build_parser()
    assert flex_main.to_cli_args(["--generate_previews=false", "--input=gs://b/x"], parser) == [
        "--input=gs://b/x", "--sdk_location=container"]
    assert "--generate-previews" in flex_main.to_cli_args(["--generate_previews=TRUE"], parser)
    assert flex_main.to_cli_args(["--skip_existing=false", "--skip_existing=true"], parser)[:2] == [
        "--no-skip-existing", "--skip-existing"]
    with pytest.raises(SystemExit, match="true or false"):
        flex_main.to_cli_args(["--generate_previews=yes"], parser)
    # a value starting with '-' stays one token; Beam's own sdk_location is kept as given
    assert flex_main.to_cli_args(["--captioning_prompt_text=-x", "--sdk_location=default"], parser) == [
        "--captioning-prompt-text=-x", "--sdk_location=default"]


def read_dockerfile() -> str:
    with open(os.path.join(DATAFLOW_DIR, "Dockerfile"), encoding="utf-8") as handle:
        return handle.read()


def test_dockerfile_uses_this_beam_and_python_and_the_launcher_entry_point():
    text = read_dockerfile()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert re.search(rf"^ARG BEAM_VERSION={re.escape(beam.__version__)}$", text, re.M)
    assert f"FROM apache/beam_python{python}_sdk:${{BEAM_VERSION}} AS beam_sdk" in text
    assert f"python{python.replace('.', '')}-template-launcher-base" in text
    assert f"python{python} -m venv" in text
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in text
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text and "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in text
    assert "ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/flex_main.py" in text
    assert "COPY templates/dataflow/flex_main.py /template/flex_main.py" in text
    assert "extras['vllm-gpu']" in text  # vLLM's pin comes from pyproject.toml, not from here
    for line in text.splitlines():  # every file the build copies exists (context: the repository root)
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert os.path.exists(os.path.join(ROOT, source)), source


def run_launch_sh(tmp_path, *args: str, extra_env: dict | None = None) -> tuple[subprocess.CompletedProcess, list]:
    """launch.sh with a stand-in gcloud that records its arguments."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.jsonl"
    stub = stub_dir / "gcloud"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{stub_dir}{os.pathsep}{os.environ['PATH']}", PROJECT="my-project",
               BUCKET="gs://my-bucket/", JOB_NAME="job-1")
    env.update(extra_env or {})
    done = subprocess.run(["bash", os.path.join(DATAFLOW_DIR, "launch.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return done, recorded


def test_launch_sh_hands_gcloud_every_value_intact(tmp_path):
    kwargs = '{"max_model_len": 8192, "limit": [1, 2]}'
    prompt = "Say what happens; then stop, please."
    done, calls = run_launch_sh(
        tmp_path, "run", "gs://my-bucket/raw clips/", "gs://my-bucket/out",
        f"vllm_kwargs={kwargs}", f"captioning_prompt_text={prompt}", "model_dir=/models/other",
    )
    assert done.returncode == 0, done.stderr
    (argv,) = calls
    assert argv[:4] == ["dataflow", "flex-template", "run", "job-1"] and "--enable-streaming-engine" not in argv
    flags = dict(a.split("=", 1) for a in argv[4:])
    assert flags["--template-file-gcs-location"] == "gs://my-bucket/templates/beam-captions.json"
    assert flags["--staging-location"] == "gs://my-bucket/staging"
    assert flags["--parameters"].startswith("^~^")
    params = dict(item.split("=", 1) for item in flags["--parameters"][3:].split("~"))
    names = {p["name"] for p in make_metadata.build_metadata()["parameters"]}
    image = "us-central1-docker.pkg.dev/my-project/beam-captions/beam-captions:latest"
    assert params == {
        "input": "gs://my-bucket/raw clips/", "output": "gs://my-bucket/out", "generate_captions": "true",
        "model_dir": "/models/other", "accelerator": ACCELERATOR, "sdk_container_image": image,
        "sdk_location": "container", "vllm_kwargs": kwargs, "captioning_prompt_text": prompt,
        "share_model_across_processes": "true", "decode_threads": "1",
    }
    assert "--additional-experiments" not in flags
    # every parameter is a template parameter or a Beam option the launcher understands
    assert set(params) - names == {"sdk_container_image", "sdk_location"}


def test_launch_sh_streaming_from_a_subscription(tmp_path):
    done, calls = run_launch_sh(tmp_path, "run", "-", "gs://my-bucket/out", "streaming=true",
                                "input_subscription=projects/p/subscriptions/clips")
    assert done.returncode == 0, done.stderr
    (argv,) = calls
    assert "--enable-streaming-engine" in argv
    flags = dict(a.split("=", 1) for a in argv[4:] if "=" in a)
    params = dict(item.split("=", 1) for item in flags["--parameters"][3:].split("~"))
    assert "input" not in params and params["input_subscription"] == "projects/p/subscriptions/clips"


def test_launch_sh_refuses_what_it_cannot_pass(tmp_path):
    done, calls = run_launch_sh(tmp_path, "run", "gs://my-bucket/raw~x/", "gs://my-bucket/out")
    assert done.returncode == 2 and "may not contain '~'" in done.stderr and not calls
    done, calls = run_launch_sh(tmp_path, "run", "gs://my-bucket/raw/", "gs://my-bucket/out", "oops")
    assert done.returncode == 2 and "NAME=VALUE" in done.stderr and not calls
    done, calls = run_launch_sh(tmp_path, "run", "gs://x/", "gs://y/", extra_env={"BUCKET": "my-bucket"})
    assert done.returncode == 2 and "gs://" in done.stderr and not calls


def test_launch_sh_template_checks_metadata_then_builds_the_spec(tmp_path):
    done, calls = run_launch_sh(tmp_path, "template", extra_env={"TAG": "v1"})
    assert done.returncode == 0, done.stderr
    (argv,) = calls
    assert argv[:4] == ["dataflow", "flex-template", "build", "gs://my-bucket/templates/beam-captions.json"]
    assert "--image=us-central1-docker.pkg.dev/my-project/beam-captions/beam-captions:v1" in argv
    assert f"--metadata-file={make_metadata.METADATA_PATH}" in argv and "--sdk-language=PYTHON" in argv


# ---------------------------------------------------------------------------------------------------
# Flink's path: portable runner, external worker pool; and the multi-process DirectRunner


def job_args(clips: str, out: str, captioner: str) -> list[str]:
    return [
        "--input", clips, "--output", out, "--generate-captions", "--model-dir", captioner, "--generate-previews",
        "--captioning-window-size", "64", "--captioning-remainder-threshold", "32",
        "--captioning-max-output-tokens", "8", "--captioning-batch-size", "4",
        "--vllm-kwargs", json.dumps(VLLM_KWARGS),
    ]


def outputs(out: str, captions: bool = True) -> dict:
    """What a run wrote, without the model's words (batching may change them slightly)."""
    rows = pq.read_table(os.path.join(out, "captions")).to_pylist()
    keys = [(r["clip_id"], r["window_index"], r["start_frame"], r["end_frame"], r["num_sampled_frames"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    if captions:
        assert all(isinstance(r["caption"], str) and r["caption"].strip() for r in rows), "a window without caption"
    else:
        assert all(r["caption"] is None for r in rows)
    return {
        "rows": set(keys),
        "previews": {os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "previews", "*", "*.webp"))},
        "failures": {os.path.basename(p) for p in glob.glob(os.path.join(out, "failures", "*.json"))},
        "metas": {os.path.basename(p) for p in glob.glob(os.path.join(out, "metas", "*.json"))},
    }


STRUCTURAL_COUNTERS = ("clips_found", "clips", "clips_failed", "windows", "captions", "previews", "failures_prepare")


@pytest.fixture(scope="module")
def in_memory_run(tmp_path_factory, captioner_dir, real_clips_dir):
    out = str(tmp_path_factory.mktemp("in-memory"))
    counts = run_job(job_args(real_clips_dir, out, captioner_dir), release_models=False)
    found = outputs(out)
    assert len(found["rows"]) >= 6 and len(found["previews"]) == len(found["rows"]) and len(found["failures"]) == 1
    return found, counts


@pytest.fixture(scope="module")
def portable_services(tmp_path_factory):
    """Beam's Python job service and a worker pool (start_worker_pool.sh, this venv) on loopback ports."""
    with services.portable_services(tmp_path_factory.mktemp("portable-logs")) as running:
        yield running


def assert_same_run(found: dict, counts: dict, expected: tuple[dict, dict]) -> None:
    expected_found, expected_counts = expected
    assert found == expected_found
    assert {k: counts.get(k) for k in STRUCTURAL_COUNTERS} == {k: expected_counts.get(k) for k in STRUCTURAL_COUNTERS}


def test_portable_runner_with_an_external_worker_pool_writes_what_the_direct_runner_writes(
    portable_services, in_memory_run, tmp_path, captioner_dir, real_clips_dir
):
    out = str(tmp_path / "portable")
    counts = run_job(job_args(real_clips_dir, out, captioner_dir) + portable_services.runner_args(),
                     release_models=False)  # (this process has no engine of this job; keep the in-memory run's)
    assert_same_run(outputs(out), counts, in_memory_run)
    # the SDK worker came from start_worker_pool.sh's pool
    assert "worker pool: python" in services.log_tail(portable_services.pool_log, 10**6)


def test_flink_options_file_is_a_valid_flink_job(captioner_dir):
    with open(os.path.join(FLINK_DIR, "flink-gpu.args"), encoding="utf-8") as handle:
        args = [line.rstrip("\n") for line in handle if line.strip() and not line.lstrip().startswith("#")]
    config, beam_args = parse_args(args + ["--input=s3://b/raw/", "--output=s3://b/out", f"--model-dir={captioner_dir}"])
    assert config.generate_captions
    options = PipelineOptions(beam_args)
    flink, portable = options.view_as(FlinkRunnerOptions), options.view_as(PortableOptions)
    assert options.get_all_options()["runner"] == "FlinkRunner"
    assert flink.flink_version in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    assert re.fullmatch(r"[\w.-]+:\d+", flink.flink_master)
    assert portable.environment_type == "EXTERNAL" and portable.environment_config == "localhost:50000"
    assert str(portable.sdk_worker_parallelism) == "1"


SHARED_ENGINE_FLAG = "--share-model-across-processes"


def test_multi_process_direct_runner_writes_what_the_in_memory_run_writes(
    in_memory_run, tmp_path, captioner_dir, real_clips_dir
):
    """Two worker processes: everything the job sends between them must pickle; the two workers
    caption through one engine shared across processes (one engine start)."""
    out = str(tmp_path / "multi-process")
    args = job_args(real_clips_dir, out, captioner_dir) + [SHARED_ENGINE_FLAG]
    counts = run_job(args + ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
                     release_models=False)
    expected, expected_counts = in_memory_run
    assert outputs(out, captions=True) == expected
    assert {k: counts.get(k) for k in STRUCTURAL_COUNTERS} == {k: expected_counts.get(k) for k in STRUCTURAL_COUNTERS}


def test_an_engine_shared_across_processes_is_used_through_its_proxy(in_memory_run, captioner_dir):
    """share_model_across_processes: RunInference hands the handler a proxy, even in the process holding the engine.

    In-process, so the engine already loaded by the in-memory run (same settings) is reused; across
    processes the proxy is the same, only the socket is not.
    """
    import numpy as np
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.testing.util import assert_that, equal_to

    from beam_captions.inference.caption_handler import VideoCaptionHandler
    from beam_captions.records import WindowRecord

    rng = np.random.default_rng(0)
    windows = [
        WindowRecord(clip_id="clip", source="mem://clip.mp4", window_index=i, start_frame=i * 30, end_frame=i * 30 + 29,
                     start_s=float(i), end_s=i + 1.0, frame_indices=(0, 1, 2, 3),
                     frames=rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8))
        for i in range(4)
    ]
    handler = VideoCaptionHandler(captioner_dir, vllm_kwargs=VLLM_KWARGS, max_output_tokens=8,
                                   caption_batch_size=2, share_across_processes=True)
    assert handler.share_model_across_processes()
    with beam.Pipeline() as pipeline:
        outcomes = (
            pipeline
            | beam.Create(windows)
            | RunInference(handler)
            | beam.Map(lambda o: (o.window_index, bool(o.caption), o.caption_model, o.failures == ()))
        )
        assert_that(outcomes, equal_to([(i, True, "captioner", True) for i in range(4)]))
