"""Thread and worker counts have documented bounds (issue 28, point 6): above one, the command refuses
in one line with exit status 2 before any work; at it, the value is taken."""

from __future__ import annotations

import pytest

from beam_captions.cli import main
from beam_captions.cli.compact_output import compact_arguments
from beam_captions.inference.serving import MAX_IN_FLIGHT
from beam_captions.limits import MAX_DECODE_THREADS, MAX_ENCODER_THREADS, MAX_LOCAL_WORKERS
from beam_captions.options import parse_args
from beam_captions.transforms.previews import GeneratePreviews

BOUNDS = [
    ("--decode-threads", "decode_threads", MAX_DECODE_THREADS),
    ("--local-workers", "local_workers", MAX_LOCAL_WORKERS),
    ("--preview-num-cpus-per-worker", "preview_num_cpus_per_worker", MAX_ENCODER_THREADS),
    ("--captioning-batch-size", "captioning_batch_size", MAX_IN_FLIGHT),
    ("--enhance-captions-batch-size", "enhance_captions_batch_size", MAX_IN_FLIGHT),
]


def test_the_bounds_are_the_documented_numbers():
    assert (MAX_DECODE_THREADS, MAX_LOCAL_WORKERS, MAX_ENCODER_THREADS, MAX_IN_FLIGHT) == (64, 1024, 64, 4096)


@pytest.mark.parametrize("flag, field, most", BOUNDS)
def test_a_count_above_its_bound_is_refused_in_one_line(flag, field, most, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--generate-previews", flag,
              str(most + 1)])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"beam-captions: error: {flag} must be at most {most}, got {most + 1}"
    assert not (tmp_path / "out").exists()  # before any work


@pytest.mark.parametrize("flag, field, most", BOUNDS)
def test_a_count_at_its_bound_is_taken(flag, field, most):
    config, _ = parse_args(["--input", "in", "--output", "out", flag, str(most)])
    assert getattr(config, field) == most


@pytest.mark.parametrize("workers", [MAX_LOCAL_WORKERS + 1, 0])
def test_compact_refuses_local_workers_out_of_bounds_in_one_line(workers, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compact", str(tmp_path), "--local-workers", str(workers)])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"beam-captions compact: error: --local-workers must be between 1 and {MAX_LOCAL_WORKERS}, "
                           f"got {workers}")
    args, _, _ = compact_arguments([str(tmp_path), "--local-workers", str(MAX_LOCAL_WORKERS)])
    assert args.local_workers == MAX_LOCAL_WORKERS


def test_generate_previews_refuses_more_encoder_threads_than_its_bound():
    with pytest.raises(ValueError, match=f"num_cpus_per_worker must be between 1 and {MAX_ENCODER_THREADS}, got 65"):
        GeneratePreviews(num_cpus_per_worker=MAX_ENCODER_THREADS + 1)
    assert GeneratePreviews(num_cpus_per_worker=MAX_ENCODER_THREADS).options["threads"] == MAX_ENCODER_THREADS


def test_the_decoder_caps_the_threads_it_is_given_and_keeps_unproven_codecs_plain() -> None:
    """The Python API passes ``decode_threads`` unchecked: the decoder itself never starts more than the bound,
    gives one thread to a codec the matrix has not proven, and skips frames only on the proven codecs."""
    from beam_captions.media.decode import _shortcuts_for

    frame_at = {0: 0}
    assert _shortcuts_for("h264", 100_000, frame_at, True).threads == MAX_DECODE_THREADS
    assert _shortcuts_for("h264", 3, frame_at, True).frame_at is frame_at
    assert _shortcuts_for("cinepak", 8, frame_at, True) == _shortcuts_for("cinepak", 1, None, False)
    assert _shortcuts_for("mpeg4", 8, frame_at, True).frame_at is None
