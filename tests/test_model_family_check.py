"""A checkpoint of another family than its flag names is refused before any work (issue 23, point 3).

The checkpoints are the tiny builders' (``tiny_models``, ``tiny_nemotron``), which carry the real
checkpoints' ``architectures`` and ``model_type``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from beam_captions.inference.checkpoint_family import (
    CAPTION_CHECKPOINTS,
    ENHANCE_CHECKPOINTS,
    caption_mismatch,
    matches,
    read_config,
)
from beam_captions.inference.variants import CAPTION_ALGORITHMS, ENHANCE_ALGORITHMS, caption_model, canonical_variant
from beam_captions.options import parse_args
from gcs import gcs  # noqa: F401  (module-scoped emulator fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny model name -> (role, family key, architecture its config.json names)
CHECKPOINTS = {
    "captioner": ("caption", "qwen2.5", "Qwen2_5_VLForConditionalGeneration"),
    "captioner-qwen3": ("caption", "qwen3", "Qwen3VLForConditionalGeneration"),
    "captioner-nemotron": ("caption", "nemotron-vl", "NemotronH_Nano_VL_V2"),
    "captioner-nemotron-omni": ("caption", "nemotron-omni", "NemotronH_Nano_Omni_Reasoning_V3"),
    "enhancer": ("enhance", "qwen2.5", "Qwen2ForCausalLM"),
    "enhancer-qwen3": ("enhance", "qwen3", "Qwen3ForCausalLM"),
}


@pytest.fixture(scope="module")
def models(tiny_models, nemotron_models) -> dict[str, str]:
    found = {**tiny_models, **nemotron_models}
    assert set(found) == set(CHECKPOINTS)
    return found


@pytest.fixture
def clips(tmp_path):
    from clips import make_clip

    folder = tmp_path / "in"
    folder.mkdir()
    make_clip(folder / "a.mp4", 8, 25.0, 32, 32)
    return str(folder)


def family_of(algorithm: str, role: str) -> str:
    return caption_model(algorithm).family.name if role == "caption" else canonical_variant(algorithm)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "beam_captions", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


# ---------------------------------------------------------------- the tables against the real configs


def test_each_tiny_checkpoint_is_its_own_family_and_no_other(models):
    for name, (role, family, architecture) in CHECKPOINTS.items():
        config = read_config(models[name])
        assert config["architectures"] == [architecture], name
        own, other = (CAPTION_CHECKPOINTS, ENHANCE_CHECKPOINTS) if role == "caption" else (ENHANCE_CHECKPOINTS, CAPTION_CHECKPOINTS)
        assert [key for key, kind in own.items() if matches(config, kind)] == [family], name
        assert not any(matches(config, kind) for kind in other.values()), name


def test_model_type_decides_only_without_architectures():
    vl = CAPTION_CHECKPOINTS["nemotron-vl"]
    # The Omni checkpoint names the VL model_type: its architecture decides.
    assert matches({"architectures": ["NemotronH_Nano_Omni_Reasoning_V3"], "model_type": "NemotronH_Nano_VL_V2"}, vl) is False
    assert matches({"model_type": "qwen2_5_vl"}, CAPTION_CHECKPOINTS["qwen2.5"]) is True
    assert matches({"model_type": "qwen2_5_vl"}, vl) is False
    assert matches({}, vl) is None and caption_mismatch({}, "nemotron", "m") is None  # cannot tell: not refused


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("model, algorithm, other", [
    ("captioner", "nemotron", "qwen2.5"),
    ("captioner-nemotron", "qwen2.5", "nemotron-bf16"),
])
def test_the_wrong_caption_family_is_refused_in_one_line_before_any_work(models, clips, tmp_path, model, algorithm, other):
    out = tmp_path / "out"
    result = cli("--input", clips, "--output", str(out), "--generate-captions", "--generate-previews",
                 "--captioning-algorithm", algorithm, "--model-dir", models[model])
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    (line,) = lines
    expected = CAPTION_CHECKPOINTS[caption_model(algorithm).family.name].architectures[0]
    assert line.startswith(f"beam-captions: error: --model-dir {models[model]} holds a {CHECKPOINTS[model][2]} ")
    assert f"--captioning-algorithm {algorithm} expects {expected}" in line
    assert f"; pass --captioning-algorithm {other}" in line
    assert not out.exists()  # refused before the output (and so before any clip) was touched


def test_the_wrong_enhancer_family_is_refused_in_one_line_before_any_work(models, clips, tmp_path):
    out = tmp_path / "out"
    result = cli("--input", clips, "--output", str(out), "--generate-captions", "--model-dir", models["captioner"],
                 "--enhance-captions", "--enhance-captions-algorithm", "qwen3",
                 "--enhance-captions-model-dir", models["enhancer"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"beam-captions: error: --enhance-captions-model-dir {models['enhancer']} holds a Qwen2ForCausalLM (qwen2) "
        "checkpoint, but --enhance-captions-algorithm qwen3 expects Qwen3ForCausalLM or Qwen3MoeForCausalLM "
        "(qwen3 or qwen3_moe); pass --enhance-captions-algorithm qwen2.5"
    ]
    assert not out.exists()


def test_every_mismatch_is_refused_and_every_match_passes(models, capsys):
    """Every algorithm against every tiny checkpoint of its role, in process."""
    for name, (role, family, _) in CHECKPOINTS.items():
        for algorithm in (CAPTION_ALGORITHMS if role == "caption" else ENHANCE_ALGORITHMS):
            if role == "caption":
                argv = ["--captioning-algorithm", algorithm, "--model-dir", models[name]]
            else:
                argv = ["--model-dir", models["captioner"], "--enhance-captions",
                        "--enhance-captions-algorithm", algorithm, "--enhance-captions-model-dir", models[name]]
            argv = ["--input", "in", "--output", "out", "--generate-captions", *argv]
            if family_of(algorithm, role) == family:
                parse_args(argv)  # passes
                continue
            with pytest.raises(SystemExit) as stopped:
                parse_args(argv)
            assert stopped.value.code == 2, (name, algorithm)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"holds a {CHECKPOINTS[name][2]} " in err and f" {algorithm} expects " in err, err


def test_a_text_model_as_captioner_says_where_it_belongs(models, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--input", "in", "--output", "out", "--generate-captions", "--model-dir", models["enhancer-qwen3"]])
    err = capsys.readouterr().err.strip()
    assert err.endswith("no --captioning-algorithm runs it (it belongs to --enhance-captions-model-dir)"), err


def test_a_model_given_in_vllm_kwargs_is_the_one_checked(models, capsys):
    kwargs = json.dumps({"model": models["captioner-nemotron"]})
    with pytest.raises(SystemExit):
        parse_args(["--input", "in", "--output", "out", "--generate-captions", "--model-dir", models["captioner"],
                    "--vllm-kwargs", kwargs])
    err = capsys.readouterr().err
    assert f"--vllm-kwargs model {models['captioner-nemotron']} holds a NemotronH_Nano_VL_V2" in err
    parse_args(["--input", "in", "--output", "out", "--generate-captions", "--model-dir", models["captioner"],
                "--captioning-algorithm", "nemotron", "--vllm-kwargs", kwargs])


def test_a_config_that_is_not_json_is_one_line(models, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(models["captioner"], broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--input", "in", "--output", "out", "--generate-captions", "--model-dir", str(broken)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "config.json is not valid JSON" in err


# ---------------------------------------------------------------- locations without a config.json yet


def test_a_directory_without_config_json_is_not_judged(models, tmp_path, monkeypatch, capsys):
    import beam_captions.options as options

    empty = tmp_path / "download-here"
    empty.mkdir()
    assert read_config(str(empty)) is None and read_config(str(tmp_path / "missing")) is None
    # Offline the download fails first, with its own message, never this check's.
    with pytest.raises(SystemExit):
        parse_args(["--input", "in", "--output", "out", "--generate-captions", "--captioning-algorithm", "nemotron",
                    "--model-dir", str(empty)])
    err = capsys.readouterr().err
    assert "is not a model directory" in err and "holds a" not in err
    # Were the check to pass it by (no download yet), this check does not refuse it either...
    monkeypatch.setattr(options, "check_model_source", lambda *a, **k: None)
    parse_args(["--input", "in", "--output", "out", "--generate-captions", "--captioning-algorithm", "nemotron",
                "--model-dir", str(empty)])

    # ...and a directory the download filled is read after it.
    def download(uri, **_):
        shutil.copy(os.path.join(models["captioner"], "config.json"), os.path.join(uri, "config.json"))

    monkeypatch.setattr(options, "check_model_source", download)
    with pytest.raises(SystemExit):
        parse_args(["--input", "in", "--output", "out", "--generate-captions", "--captioning-algorithm", "nemotron",
                    "--model-dir", str(empty)])
    assert "holds a Qwen2_5_VLForConditionalGeneration (qwen2_5_vl) checkpoint" in capsys.readouterr().err


def test_a_gs_prefix_is_checked_by_its_config_json(gcs, models, capsys):  # noqa: F811
    gcs.create_bucket("family-models")
    prefix = "gs://family-models/captioner"
    gcs.upload_file(os.path.join(models["captioner"], "config.json"), f"{prefix}/config.json")
    parse_args(["--input", "in", "--output", "out", "--generate-captions", "--model-dir", prefix])
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--input", "in", "--output", "out", "--generate-captions", "--captioning-algorithm", "nemotron",
                    "--model-dir", prefix])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(f"beam-captions: error: --model-dir {prefix} holds a Qwen2_5_VL")
