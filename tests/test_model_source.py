"""Model weights from a local folder, a gs:// prefix (copied once per machine) or the hub (fails fast offline)."""

from __future__ import annotations

from types import SimpleNamespace

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from beam_captions.inference import model_source
from beam_captions.inference.model_source import (
    COMPLETE_MARKER,
    PINNED_REVISIONS,
    ModelUnavailableError,
    check_model_source,
    has_weights,
    resolve_model_dir,
)
from beam_captions.inference.variants import CAPTION_MODELS, ENHANCE_MODELS
from beam_captions.options import parse_args
from gcs import gcs  # noqa: F401  (module-scoped emulator fixture)

CAPTIONER = CAPTION_MODELS["qwen2.5"]
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def models_bucket(gcs, captioner_dir):  # noqa: F811
    """The tiny captioner under ``gs://models/captioner``."""
    gcs.create_bucket("models")
    names = gcs.upload_dir(captioner_dir, "gs://models/captioner")
    assert "config.json" in names and "model.safetensors" in names
    return "gs://models/captioner"


def same_tree(left: str, right: str) -> bool:
    files = sorted(p.relative_to(left).as_posix() for p in Path(left).rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(left, right, files, shallow=False)
    return files and match == files and not mismatch and not errors


def test_every_known_model_has_a_pinned_commit():
    for model_id in [*CAPTION_MODELS.values(), *ENHANCE_MODELS.values()]:
        assert re.fullmatch(r"[0-9a-f]{40}", PINNED_REVISIONS[model_id]), model_id


def test_a_local_directory_with_weights_is_used_as_it_is(captioner_dir, monkeypatch):
    monkeypatch.setattr(model_source, "_download", lambda *a: pytest.fail("no download for a full folder"))
    assert has_weights(captioner_dir)
    assert resolve_model_dir(captioner_dir, model_id=CAPTIONER) == captioner_dir
    assert resolve_model_dir(f"file://{captioner_dir}", model_id=CAPTIONER) == captioner_dir
    check_model_source(captioner_dir, model_id=CAPTIONER)


def test_a_sharded_checkpoint_needs_every_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert not has_weights(str(tmp_path))  # an interrupted download
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert has_weights(str(tmp_path))


def test_a_gs_prefix_is_copied_once(models_bucket, captioner_dir, tmp_path, monkeypatch):
    from apache_beam.io.filesystems import FileSystems

    cache = str(tmp_path / "cache")
    local = resolve_model_dir(models_bucket, model_id=CAPTIONER, cache_dir=cache)
    assert os.path.dirname(local) == cache and same_tree(captioner_dir, local)
    assert os.path.isfile(os.path.join(local, COMPLETE_MARKER)) and has_weights(local)
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]
    mtimes = {p: p.stat().st_mtime_ns for p in Path(local).rglob("*")}

    opened = []
    original_open = FileSystems.open
    monkeypatch.setattr(FileSystems, "open", staticmethod(lambda *a, **k: opened.append(a) or original_open(*a, **k)))
    assert resolve_model_dir(models_bucket + "/", model_id=CAPTIONER, cache_dir=cache) == local
    assert resolve_model_dir(models_bucket, model_id=CAPTIONER, cache_dir=cache) == local
    assert opened == [] and {p: p.stat().st_mtime_ns for p in Path(local).rglob("*")} == mtimes

    monkeypatch.setenv("BEAM_CAPTIONS_CACHE", cache)  # the default cache root
    assert resolve_model_dir(models_bucket, model_id=CAPTIONER) == local and opened == []


def test_a_gs_prefix_without_a_model_is_refused(gcs, models_bucket, tmp_path):  # noqa: F811
    check_model_source(models_bucket, model_id=CAPTIONER)
    gcs.upload_bytes(b"not a model", "gs://models/junk/readme.txt")
    for uri in ("gs://models/nothing", "gs://models/junk"):
        with pytest.raises(ModelUnavailableError) as error:
            resolve_model_dir(uri, model_id=CAPTIONER, cache_dir=str(tmp_path))
        assert str(error.value).startswith(f"{uri} is not a model directory") and "\n" not in str(error.value)
        with pytest.raises(ModelUnavailableError, match="no config.json") as error:
            check_model_source(uri, model_id=CAPTIONER)
        assert "\n" not in str(error.value) and f"hf download {CAPTIONER}" in str(error.value)
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == []  # nothing half-copied is left


CHILD = textwrap.dedent("""
    import json, os, sys, time
    from gcs import anonymous_beam
    anonymous_beam()
    from beam_captions.inference import model_source

    uri, cache, log, ready = sys.argv[1:5]
    copy_tree = model_source._copy_tree

    def slow_counted_copy(source, target):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # widen the window in which an unlocked second process would copy too
        return copy_tree(source, target)

    model_source._copy_tree = slow_counted_copy
    open(os.path.join(ready, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(ready)) < 2 and time.monotonic() < deadline:  # start together
        time.sleep(0.01)
    print(json.dumps(model_source.resolve_model_dir(uri, model_id="unused", cache_dir=cache)))
""")


def test_two_processes_copy_the_model_once(models_bucket, captioner_dir, tmp_path):
    cache, log, ready = tmp_path / "cache", tmp_path / "copies.log", tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, models_bucket, str(cache), str(log), str(ready)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [child.communicate(timeout=120) for child in children]
    for child, (out, err) in zip(children, results):
        assert child.returncode == 0, err[-3000:]
    dirs = {json.loads(out.strip().splitlines()[-1]) for out, _ in results}
    assert len(dirs) == 1
    (local,) = dirs
    assert len(log.read_text().split()) == 1, "the model was copied more than once"
    assert same_tree(captioner_dir, local)
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(local), f".{os.path.basename(local)}.lock"])


def test_two_threads_download_from_the_hub_once(captioner_dir, tmp_path, monkeypatch):
    """A folder without weights is filled from the hub at the pinned commit, once (hub calls faked)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def snapshot_download(repo_id, *, revision, local_dir, **_):
        calls.append((repo_id, revision))
        time.sleep(0.3)
        shutil.copytree(captioner_dir, local_dir, dirs_exist_ok=True)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **_: None)
    target = str(tmp_path / "models" / "captioner")
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model_dir(target, model_id=CAPTIONER)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target, target] and has_weights(target)
    assert calls == [(CAPTIONER, PINNED_REVISIONS[CAPTIONER])]


def assert_fetch_hint(message: str, directory: str, model_id: str = CAPTIONER) -> None:
    assert "\n" not in message
    assert directory in message and model_id in message
    assert f"hf download {model_id} --revision {PINNED_REVISIONS[model_id]} --local-dir {directory}" in message


@pytest.mark.parametrize("exists", [True, False])
def test_offline_an_empty_directory_fails_at_once_with_the_fetch_command(tmp_path, monkeypatch, exists):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = str(tmp_path / "captioner")
    if exists:
        os.mkdir(directory)
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError) as error:
        resolve_model_dir(directory, model_id=CAPTIONER)
    assert time.monotonic() - started < 1
    assert_fetch_hint(str(error.value), directory)
    assert "HF_HUB_OFFLINE" in str(error.value)
    assert os.listdir(tmp_path) == (["captioner"] if exists else [])  # offline, nothing is created


def test_an_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    import socket

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read when huggingface_hub was imported
    with socket.socket() as probe:  # a port nobody listens on: never the real hub, even online
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    directory = str(tmp_path / "empty")
    os.mkdir(directory)
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError) as error:
        check_model_source(directory, model_id=ENHANCE_MODELS["qwen3"])
    assert time.monotonic() - started < 5
    assert_fetch_hint(str(error.value), directory, ENHANCE_MODELS["qwen3"])
    assert "ConnectError" in str(error.value), str(error.value)


def test_the_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest
    empty = str(tmp_path / "captioner")
    os.mkdir(empty)
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--input", "in", "--output", "out", "--generate-captions", "--model-dir", empty])
    assert time.monotonic() - started < 5
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"beam-captions: error: --model-dir {empty} is not a model directory")
    assert_fetch_hint(err.strip(), empty)


def test_the_cli_picks_the_hub_model_of_the_algorithm(tmp_path, captioner_dir, capsys):
    empty = str(tmp_path / "enhancer")
    with pytest.raises(SystemExit):
        parse_args(["--input", "in", "--output", "out", "--generate-captions", "--model-dir", captioner_dir,
                    "--enhance-captions", "--enhance-captions-algorithm", "qwen3",
                    "--enhance-captions-model-dir", empty])
    err = capsys.readouterr().err
    assert "--enhance-captions-model-dir" in err
    assert_fetch_hint(err.strip(), empty, ENHANCE_MODELS["qwen3"])


def test_the_engine_starts_vllm_on_the_local_copy(models_bucket, captioner_dir, tmp_path, monkeypatch):
    """``Engine.start`` hands vLLM the resolved local folder, never the gs:// URI (vLLM itself faked)."""
    import vllm

    from beam_captions.inference.engine import Engine, EngineSettings

    monkeypatch.setenv("BEAM_CAPTIONS_CACHE", str(tmp_path / "cache"))
    started = []
    monkeypatch.setattr(vllm.AsyncLLMEngine, "from_engine_args", lambda args: started.append(vars(args)) or SimpleNamespace(shutdown=lambda: None))
    settings = EngineSettings(model_dir=models_bucket, hub_model_id=CAPTIONER, extra={"enforce_eager": True})
    engine = Engine(settings)
    engine.start()
    (kwargs,) = started
    assert kwargs["model"].startswith(str(tmp_path / "cache")) and same_tree(captioner_dir, kwargs["model"])
    assert kwargs["enforce_eager"] is True and engine.name == "captioner"


def test_pixel_bounds_are_read_from_a_gs_model_prefix(models_bucket, captioner_dir):
    from beam_captions.inference.frame_bounds import model_frame_bounds, reference_bounds

    bounds = model_frame_bounds(models_bucket, "qwen2.5")  # the tiny model's video config tightens the reference's
    assert bounds == model_frame_bounds(captioner_dir, "qwen2.5") != reference_bounds("qwen2.5")
    assert bounds.pixels(8) != reference_bounds("qwen2.5").pixels(8)
