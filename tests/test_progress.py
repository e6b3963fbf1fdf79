import io

from beam_captions import progress
from beam_captions.progress import ProgressReporter, progress_line
from beam_captions.summary import format_summary


def test_progress_line_reports_counts_and_rate():
    line = progress_line({"clips_found": 4, "clips_decoded": 3, "windows_prepared": 10, "windows_captioned": 5,
                          "previews_encoded": 7}, 10.0)
    assert "clips 3/4 decoded" in line and "10 prepared, 5 captioned, 0 enhanced" in line
    assert "previews 7" in line and "0.50 captions/s" in line


def test_progress_line_counts_outcomes_not_attempts():
    """Windows whose caption failed (an engine that could not start) are not counted as captioned."""
    line = progress_line({"clips_found": 3, "clips_decoded": 3, "windows_prepared": 6, "windows_caption_failed": 6}, 3.0)
    assert "6 prepared, 0 captioned, 0 enhanced, 6 caption failed" in line


def test_reporter_writes_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    with ProgressReporter(stream=stream, interval=0.01):
        progress.bump("clips_found", 2)
        progress.bump("windows_captioned")
    lines = stream.getvalue().splitlines()
    assert lines and "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert "clips 0/2 decoded" in lines[-1] and "1 captioned" in lines[-1]


def test_summary_counts_failures_by_stage_and_flags():
    text = format_summary({"clips_found": 3, "clips_failed": 1, "windows": 4, "captions": 4, "failures_prepare": 1,
                           "failures_caption": 2, "flagged_truncated": 4, "flagged_refusal": 1,
                           "caption_prompt_tokens": 12350}, "out", 8.0)
    assert "failures         3 (caption 2, prepare 1)" in text
    assert "prompt tokens    12350 (3087 per window)" in text
    assert "flagged captions refusal 1, truncated 4" in text and "captions         4 (0.50/s)" in text
