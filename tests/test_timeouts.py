"""Durations a user passes stay within what the platform can wait (issue 30): a ``--*-seconds`` flag above
``MAX_SECONDS`` is refused in one line with exit status 2 before any work, at it the value is taken, and every wait
made from it (a request, a window's place, a bundle) is one a thread can make."""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future

import pytest

from beam_captions.cli import main
from beam_captions.inference.caption_handler import VideoCaptionHandler
from beam_captions.limits import MAX_SECONDS
from beam_captions.options import parse_args
from beam_captions.transforms._inference import ServeWindows

DURATIONS = [
    ("--model-request-timeout-seconds", "model_request_timeout_seconds"),
    ("--clip-time-budget-seconds", "clip_time_budget_seconds"),
    ("--watch-interval-seconds", "watch_interval_seconds"),
    ("--window-seconds", "window_seconds"),
    ("--lateness-horizon-seconds", "lateness_horizon_seconds"),
]


def test_the_bound_is_the_documented_number_and_a_thread_cannot_wait_past_the_platform_s_limit():
    assert MAX_SECONDS == 10**8
    with pytest.raises(OverflowError):  # what --model-request-timeout-seconds 1e12 met in a thread's wait
        threading.Lock().acquire(timeout=1e12)


@pytest.mark.parametrize("flag, field", DURATIONS)
@pytest.mark.parametrize("value", ["1e12", str(MAX_SECONDS + 1)])
def test_a_duration_above_the_bound_is_refused_in_one_line(flag, field, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--generate-previews", flag, value])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"beam-captions: error: {flag} must be at most {MAX_SECONDS} (about 3 years), "
                    f"got {float(value):g}")
    assert not (tmp_path / "out").exists()  # before any work


@pytest.mark.parametrize("flag, field", DURATIONS)
def test_a_duration_at_the_bound_is_taken(flag, field):
    config, _ = parse_args(["--input", "in", "--output", "out", flag, str(MAX_SECONDS)])
    assert getattr(config, field) == MAX_SECONDS


def test_every_wait_made_from_the_longest_request_timeout_is_one_a_thread_can_make():
    """The request wait, a window's place (every call of every attempt) and the bundle's wait, at the bound."""
    handler = VideoCaptionHandler("unused-timeouts", request_timeout_s=MAX_SECONDS, retry_flagged=True,
                                  generate_stage2_caption=True)
    waits = [handler.request_timeout_s, handler.load_model().lease_s, ServeWindows(handler).bundle_timeout_s]
    assert waits[1] == waits[2] > 6 * MAX_SECONDS
    done: Future = Future()
    done.set_result("answer")
    for seconds in waits:
        assert seconds < threading.TIMEOUT_MAX
        assert threading.Lock().acquire(timeout=seconds)  # no OverflowError
        assert done.result(timeout=seconds) == "answer"


@pytest.mark.parametrize("seconds", [1e12, MAX_SECONDS + 1, 0, -1, math.nan])
def test_a_handler_refuses_a_request_timeout_out_of_bounds(seconds):
    """The Python API is checked too: a handler built with such a timeout fails at once, not in a wait."""
    with pytest.raises(ValueError, match="request_timeout_s must be positive and at most 100000000 s"):
        VideoCaptionHandler("unused-timeouts", request_timeout_s=seconds)


@pytest.mark.parametrize("hours", ["1e13", str(MAX_SECONDS // 3600 + 1)])
def test_compact_refuses_a_retention_that_deltalake_cannot_hold_in_one_line(hours, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # 1e13 hours: a Rust panic in deltalake's vacuum before the bound
        main(["compact", str(tmp_path), "--retention-hours", hours])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--retention-hours must be at most" in line and "about 3 years" in line
