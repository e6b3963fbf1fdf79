"""Quiet by default (issue 15, section 5): progress, our warnings once per kind, errors and the summary on the
terminal; every library log in the log file (and on the terminal with --verbose)."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import subprocess
import sys

import pytest
from audit import run_command
from clips import make_clip

from beam_captions.logs import setup_logging, warn
from beam_captions.progress import progress_line
from beam_captions.summary import format_summary
from conftest import VLLM_KWARGS

PROGRESS = re.compile(r"^\[\s*\d+ s\] clips ")


def summary_lines(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("beam-captions finished"))
    return lines[start:]


@pytest.mark.parametrize("verbose", [False, True])
def test_library_logs_go_to_the_file_and_to_the_terminal_only_with_verbose(tmp_path, capsys, verbose):
    setup = setup_logging(str(tmp_path / "out"), verbose=verbose)
    try:
        logging.getLogger("apache_beam.runners.worker").warning("a library warning")
        logging.getLogger("beam_captions.something").warning("our own warning")
        for _ in range(3):
            warn("preview_height", "clip %s is small", "x")
    finally:
        setup.close()
    err = capsys.readouterr().err
    assert ("a library warning" in err) == verbose
    assert "our own warning" in err
    assert (err.count("clip x is small") == 3) if verbose else "clip x is small" not in err
    (log_file,) = glob.glob(str(tmp_path / "out" / "logs" / "*.log"))
    assert setup.path == log_file
    text = open(log_file).read()
    assert "a library warning" in text and "our own warning" in text and text.count("clip x is small") == 3
    assert "VLLM_LOGGING_CONFIG_PATH" not in os.environ or os.environ["VLLM_LOGGING_CONFIG_PATH"] != setup.vllm_config
    assert not any(getattr(h, "_beam_captions", False) for h in logging.getLogger().handlers)


def test_after_a_stop_runner_threads_print_nothing_on_the_terminal(tmp_path, capfd):
    """A library set up ``logging.basicConfig`` before the run; the run replaces that handler. After a stop
    (the process ends next), what runner threads still log must not reach the terminal through it."""
    root = logging.getLogger()
    before = list(root.handlers)
    for stopping in (True, False):
        root.addHandler(logging.StreamHandler(sys.__stderr__))
        stderr = sys.stderr
        try:
            setup_logging(str(tmp_path / "out")).close(stopping=stopping)
            sys.stderr = stderr  # a stop points it at os.devnull, as the process ends next
            logging.getLogger("beam_captions.transforms.prepare").warning("late warning %s", stopping)
        finally:
            sys.stderr = stderr
            for handler in set(root.handlers) - set(before):
                root.removeHandler(handler)
    err = capfd.readouterr().err
    assert "late warning True" not in err
    assert "late warning False" in err  # a run that ends normally gives the handler back


def test_a_stop_leaves_open_the_stream_the_terminal_lines_went_to(tmp_path, capsys):
    """Without a real descriptor 2 (here a captured stream) the run writes its terminal lines to sys.stderr
    itself; a stop's close must not close that stream, though it points sys.stderr elsewhere first."""
    stderr = sys.stderr
    try:
        setup_logging(str(tmp_path / "out")).close(stopping=True)
    finally:
        sys.stderr = stderr
    assert not stderr.closed


def test_vllm_processes_are_configured_to_log_to_the_file(tmp_path):
    setup = setup_logging(str(tmp_path / "out"), log_file=str(tmp_path / "run.log"))
    try:
        config = json.load(open(os.environ["VLLM_LOGGING_CONFIG_PATH"]))
        assert os.environ["VLLM_CONFIGURE_LOGGING"] == "1"
    finally:
        setup.close()
    assert setup.path == str(tmp_path / "run.log")
    handlers = config["loggers"]["vllm"]["handlers"]
    assert handlers == ["file"] and config["handlers"]["file"]["filename"] == str(tmp_path / "run.log")


def test_warnings_that_repeat_per_clip_are_told_once_per_kind():
    text = format_summary({"clips_found": 1000, "warnings_preview_height": 1000, "warnings_preview_fps": 3}, "out",
                          1.0, captions=False)
    assert "warnings         3 clips below the preview frame rate, 1000 clips below the preview height" in text
    assert not any(line.split()[0] in ("captions", "prompt", "flagged") for line in text.splitlines()[1:])
    assert "warnings         1 clip below the preview height" in format_summary({"warnings_preview_height": 1}, "o", 1.0)


def test_progress_says_while_listing_and_leaves_captions_out_of_previews_only_runs():
    counts = {"clips_found": 12, "clips_decoded": 3, "previews_encoded": 5, "listings_done": 1}
    line = progress_line(counts, 10.0, captions=False, locations=2)
    assert "clips 3/12+ decoded (listing)" in line and "captioned" not in line and "captions/s" not in line
    line = progress_line(dict(counts, listings_done=2), 10.0, captions=False, locations=2)
    assert "clips 3/12 decoded |" in line and "0.50 previews/s" in line
    assert "captioned" in progress_line(counts, 10.0)


def test_a_previews_run_on_small_clips_warns_once_in_the_summary(tmp_path):
    clips = tmp_path / "in"
    clips.mkdir()
    for i in range(3):
        make_clip(clips / f"c{i}.mp4", 8, 25.0, 32, 32)
    result = run_command([sys.executable, "-m", "beam_captions", "--input", str(clips), "--output",
                          str(tmp_path / "out"), "--generate-previews"], timeout=300)  # its summary audited
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warnings         3 clips below the preview height" in result.stdout
    assert [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS.match(line)] == []
    assert "source height 32px" in open(glob.glob(str(tmp_path / "out" / "logs" / "*.log"))[0]).read()


def test_a_captions_run_prints_no_library_log_without_verbose(tmp_path, captioner_dir, real_clips_dir):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "beam_captions", "--input", real_clips_dir, "--output", str(out),
               "--generate-captions", "--model-dir", captioner_dir, "--vllm-kwargs", json.dumps(VLLM_KWARGS),
               "--captioning-sampling-fps", "1", "--captioning-max-output-tokens", "8", "--generate-previews"]
    result = run_command(command, timeout=600)  # its summary audited against the output
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_lines(result.stdout)
    assert result.stdout.splitlines() == summary, result.stdout  # nothing but the summary on stdout
    noise = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert noise == [], "\n".join(noise)
    (log_file,) = glob.glob(str(out / "logs" / "*.log"))
    assert "vllm" in open(log_file).read()


def test_a_run_refused_while_its_flags_are_checked_prints_its_refusal_alone(tmp_path, captioner_dir):
    """Asking this CPU machine's vLLM whether it can prune imports vLLM, which warns that Triton has no CPU
    backend; that line is for the log file, and the refused run has none: its refusal is all it prints."""
    from beam_captions.inference.pruning import pruning_runs_here

    if pruning_runs_here():
        pytest.skip("this machine's engines can prune: nothing is refused")
    command = [os.path.join(os.path.dirname(sys.executable), "beam-captions"), "--input", str(tmp_path),
               "--output", str(tmp_path / "out"), "--generate-captions", "--model-dir", captioner_dir,
               "--captioning-video-pruning-rate", "0.5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("beam-captions: error: --captioning-video-pruning-rate 0.5: video token pruning needs a GPU")
    assert not (tmp_path / "out").exists()


def test_what_is_logged_while_the_flags_are_checked_goes_to_the_run_log(tmp_path, capfd):
    from beam_captions.logs import held_for_log_file

    with held_for_log_file():  # a library not configured yet (vLLM's own logger is, once an engine started here)
        logging.getLogger("a_library.importing").warning("Triton is installed, but doesn't include CPU backend.")
    setup = setup_logging(str(tmp_path / "out"))
    setup.close()
    assert "Triton" not in capfd.readouterr().err
    assert "WARNING a_library.importing [pid" in open(setup.path).read()
