"""Stopping a local run: a swallowed KeyboardInterrupt still ends the process, with its summary."""

import signal
import subprocess
import sys
import time

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
    assert process.returncode == 0 and time.monotonic() - started < 10
    assert output.split() == ["SWALLOWED", "FINISHED"]
