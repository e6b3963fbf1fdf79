"""Stopping a local run: a swallowed KeyboardInterrupt still ends the process, with its summary; Ctrl-C and
SIGTERM end a real run within seconds with its summary and exit 130 / 143."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from clips import make_clip

SCRIPT = """
import time
from beam_captions.cli import _StopOnSignal
with _StopOnSignal(lambda: print("FINISHED", flush=True), grace_s=1.0):
    ready = False
    while True:  # a runner that catches the interrupt inside a bundle and keeps going
        try:
            if not ready:
                ready = True
                print("READY", flush=True)
            time.sleep(0.05)
        except KeyboardInterrupt:
            print("SWALLOWED", flush=True)
"""


def test_a_runner_that_swallows_the_interrupt_is_finished_by_the_watchdog():
    process = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "READY"
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 143 and time.monotonic() - started < 10  # 128 + SIGTERM
    assert output.split() == ["SWALLOWED", "FINISHED"]


@pytest.fixture(scope="module")
def many_clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    for i in range(40):
        make_clip(folder / f"clip{i:02d}.mp4", 64, 25.0, 160, 120)
    return str(folder)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_real_run_stops_within_seconds_with_its_summary_and_exit_code(tmp_path, many_clips, signum, code):
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "beam_captions", "--input", many_clips, "--output", out, "--generate-previews",
               "--preview-target-height", "64", "--preview-target-fps", "8", "--captioning-window-size", "16",
               "--captioning-remainder-threshold", "8", "--local-workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not glob.glob(os.path.join(out, "metas", "*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be stopped"
    process.send_signal(signum)
    started = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr[-3000:]
    assert time.monotonic() - started < 25
    assert "beam-captions finished" in stdout and "clips found" in stdout
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "stopped" in stderr
    finished = len(glob.glob(os.path.join(out, "metas", "*.json")))
    assert 0 < finished < 40
