"""Stopping a local run: a swallowed KeyboardInterrupt still ends the process, with its summary; Ctrl-C and
SIGTERM end a real run within seconds with its summary and exit 130 / 143, also while the engine starts or
generates, with no traceback and a summary that adds up; an engine that cannot start is one line."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from audit import audit, run_command, snapshot
from clips import make_clip

from conftest import VLLM_KWARGS
from gcs import storage_emulator

SCRIPT = """
import time
from beam_captions.cli.stops import StopOnSignal
with StopOnSignal(lambda: print("FINISHED", flush=True), grace_s=1.0):
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


LATE_RUNNER = """
import time
from beam_captions.cli.stops import StopOnSignal
stop = StopOnSignal(lambda: (time.sleep(0.5), print("FINISHED", flush=True)), grace_s=1.0)
try:
    with stop:
        print("READY", flush=True)
        try:
            time.sleep(30)
        except KeyboardInterrupt:
            time.sleep(1.2)  # the runner holds the main thread past the grace period, then lets go
            raise
except KeyboardInterrupt:
    stop.leave_to_watchdog()
    print("MAIN", flush=True)
"""


def test_a_runner_that_lets_go_after_the_grace_period_gets_one_stop_line_and_one_summary():
    """The watchdog took over; the main thread, let go while it finishes, writes nothing of its own."""
    process = subprocess.Popen([sys.executable, "-c", LATE_RUNNER], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "READY"
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 130 and output.split() == ["FINISHED"]


# The kernel may hand a process's signal to any of its threads; Python runs the handler only in the main thread,
# when it next runs Python code. Here the main thread waits on a lock for ever and the signal goes to another.
SIGNAL_TO_A_WORKER_THREAD = """
import signal, sys, threading, time
from beam_captions.cli.stops import {stopper}
from beam_captions.io import compaction  # a compaction's stop asks it to start no merge

def worker():
    print("READY", flush=True)
    time.sleep(0.2)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # this thread's, not the main thread's
    time.sleep(60)

with {stopper}({arguments}):
    threading.Thread(target=worker, daemon=True).start()
    waiting = threading.Lock()
    waiting.acquire()
    waiting.acquire()  # as the DirectRunner's main thread waits on a stage's futures
"""


def run_with_the_main_thread_waiting(stopper: str, arguments: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SIGNAL_TO_A_WORKER_THREAD.format(stopper=stopper, arguments=arguments)],
                          capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - started


def test_a_signal_another_thread_receives_stops_a_run_whose_main_thread_waits():
    done, took = run_with_the_main_thread_waiting("StopOnSignal", 'lambda: print("FINISHED", flush=True), grace_s=1.0')
    assert done.returncode == 143 and took < 20, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["READY", "FINISHED"]


SIGNAL_WHILE_THE_SUMMARY_IS_WRITTEN = """
import os, signal, time
from beam_captions.cli.stops import StopOnSignal

stop = StopOnSignal(lambda: print("WATCHDOG", flush=True), grace_s=0.5)
with stop:
    pass  # the run ends
os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the engines shut down and the summary is written
time.sleep(1.0)
print("SUMMARY", stop.signum, flush=True)
stop.restore()
"""


def test_a_signal_after_the_run_ended_lets_its_summary_be_written():
    done = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_THE_SUMMARY_IS_WRITTEN], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["SUMMARY", "None"]


FAKE_DATAFLOW = """
import os, signal, sys, time
import apache_beam as beam


class FakeDataflowResult:
    \"\"\"What pipeline.run() returns once Dataflow accepted the job (a remote service these tests cannot
    reach): waiting for it is where Ctrl-C / SIGTERM come.\"\"\"

    def job_id(self):
        return "2026-11-18_03_07_00-1234567890"

    def wait_until_finish(self, duration=None):
        os.kill(os.getpid(), signal.SIGTERM)
        while True:
            time.sleep(0.05)

    def cancel(self):
        print("CANCELLED", flush=True)


beam.Pipeline.run = lambda self, *args, **kwargs: FakeDataflowResult()
from gcs import anonymous_beam
anonymous_beam()  # Dataflow's option checks look at the temp bucket: the emulator's, anonymously
from beam_captions.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("runner, flags, cancelled", [
    ("DataflowRunner", [], False),
    ("DataflowRunner", ["--cancel-on-stop"], True),
    ("DirectRunner", [], True),  # a local run's job is this process: stopped either way
])
def test_a_stop_leaves_a_dataflow_job_running_unless_asked_to_cancel_it(tmp_path, runner, flags, cancelled):
    """Ctrl-C / SIGTERM to a launcher waiting for its Dataflow job: it stops waiting and says how to cancel
    the job, which keeps running (Beam's own behaviour), unless --cancel-on-stop; a local run is cancelled."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    command = [sys.executable, "-c", FAKE_DATAFLOW, "--input", str(inputs), "--output", str(tmp_path / "out"),
               "--generate-previews", "--no-gallery", f"--runner={runner}", "--project=test-project",
               "--region=europe-west4", "--temp_location=gs://beam-captions-stop/tmp", "--no_auth", *flags]
    tests = os.path.dirname(os.path.abspath(__file__))
    with storage_emulator("beam-captions-stop"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 143, done.stderr[-3000:]
    assert ("CANCELLED" in done.stdout.split()) == cancelled, done.stdout[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    job = "2026-11-18_03_07_00-1234567890"
    if runner == "DataflowRunner" and not cancelled:
        assert told(done.stderr) == [
            f"beam-captions: stopped waiting; the Dataflow job {job} keeps running: cancel it with "
            f"`gcloud dataflow jobs cancel {job} --region europe-west4` or run with --cancel-on-stop"], done.stderr
    elif runner == "DataflowRunner":
        assert told(done.stderr) == [f"beam-captions: stopped; what is finished is kept, a re-run completes the rest "
                                     f"(cancelling the Dataflow job {job}, --cancel-on-stop)"], done.stderr
    else:
        assert told(done.stderr) == ["beam-captions: stopped; what is finished is kept, a re-run completes the rest"]


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
    before = snapshot(out)
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
    assert "beam-captions stopped after" in stdout and "clips found" in stdout
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "stopped" in stderr
    finished = len(glob.glob(os.path.join(out, "metas", "*.json")))
    assert 0 < finished < 40
    audit(out, stdout, before=before)


def windows_line(stdout: str) -> tuple[int, dict[str, int]]:
    """The summary's windows: ``prepared`` and its parts (``captioned``, ``failed``, ``written``, ``not reached``)."""
    found = re.search(r"^  windows +(\d+) \(([^)]*)\)", stdout, re.MULTILINE)
    assert found, stdout
    parts = {name: int(n) for n, name in re.findall(r"(\d+) ([a-z ]+?)(?:,|$)", found.group(2))}
    return int(found.group(1)), parts


def told(stderr: str) -> list[str]:
    """What the terminal's stderr said besides the progress lines (``[   30 s] ...``)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[")]


def summary_count(stdout: str, name: str) -> int:
    return int(re.search(rf"^  {name} +(\d+)", stdout, re.MULTILINE).group(1))


def captioned_on_disk(out: str) -> int:
    """Windows with a caption in the Parquet files that a metas names (clips finished on disk)."""
    total = 0
    for path in glob.glob(os.path.join(out, "metas", "*.json")):
        with open(path) as handle:
            meta = json.load(handle)
        if meta.get("captions_file"):
            rows = pq.read_table(os.path.join(out, meta["captions_file"])).to_pylist()
            total += sum(1 for row in rows if row["caption"])
    return total


def captions_command(clips: str, out: str, model_dir: str, tokens: int) -> list[str]:
    return [sys.executable, "-m", "beam_captions", "--input", clips, "--output", out, "--generate-captions",
            "--generate-previews", "--model-dir", model_dir, "--captioning-window-size", "16",
            "--captioning-remainder-threshold", "8", "--captioning-max-output-tokens", str(tokens),
            "--vllm-kwargs", json.dumps(VLLM_KWARGS), "--no-gallery"]


def _log_text(out: str) -> str:
    logs = glob.glob(os.path.join(out, "logs", "*.log"))
    if not logs:
        return ""
    with open(logs[0], errors="replace") as handle:
        return handle.read()


@pytest.mark.parametrize("moment", ["engine start", "generation"])
def test_a_captions_run_stopped_at_any_moment_tells_the_terminal_and_adds_up(tmp_path, many_clips, captioner_dir,
                                                                            moment):
    out = str(tmp_path / "out")
    clips = str(tmp_path / "clips")
    os.makedirs(clips)
    for name in sorted(os.listdir(many_clips))[:12]:
        shutil.copy(os.path.join(many_clips, name), clips)
    before = snapshot(out)
    process = subprocess.Popen(captions_command(clips, out, captioner_dir, 200), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if moment == "engine start" and "starting vLLM" in _log_text(out):
            break
        if moment == "generation" and captioned_on_disk(out) > 0:
            break
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be stopped"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
    assert "beam-captions: stopped" in stderr and "beam-captions stopped after" in stdout
    # one stop line: the run's own, or the watchdog's when the runner held the main thread past the grace
    # period (an engine start on a loaded machine)
    assert told(stderr) in (["beam-captions: stopped; what is finished is kept, a re-run completes the rest"],
                            ["beam-captions: stopped (the runner kept going; finishing from the watchdog)"]), stderr
    prepared, parts = windows_line(stdout)
    assert parts["captioned"] + parts["failed"] + parts.get("not reached", 0) == prepared
    assert summary_count(stdout, "previews") <= prepared
    assert "duplicates" not in stdout  # nothing is a late duplicate on a first run
    on_disk = captioned_on_disk(out)
    assert on_disk <= parts["captioned"] <= on_disk + 4  # a clip being written as the stop came may count
    if moment == "generation":
        assert on_disk > 0
    audit(out, stdout, before=before)


def test_an_engine_that_cannot_start_is_one_line_and_every_clip_is_recorded_failed(tmp_path, many_clips,
                                                                                 captioner_dir):
    broken = str(tmp_path / "broken-captioner")
    shutil.copytree(captioner_dir, broken)
    for weights in glob.glob(os.path.join(broken, "*.safetensors")):
        with open(weights, "r+b") as handle:
            handle.truncate(64)  # config and tokenizer are fine: the family check passes, the load fails
    clips = str(tmp_path / "clips")
    os.makedirs(clips)
    for name in sorted(os.listdir(many_clips))[:3]:
        shutil.copy(os.path.join(many_clips, name), clips)
    out = str(tmp_path / "out")
    command = captions_command(clips, out, broken, 8)
    first = run_command(command, timeout=300)  # its summary audited: every clip failed, none captioned
    assert first.returncode == 1, first.stderr[-3000:]
    errors = [line for line in first.stderr.splitlines() if line.startswith("beam-captions: error:")]
    assert len(errors) == 1 and "could not start" in errors[0] and "see root cause" not in errors[0].lower()
    assert "Traceback" not in first.stderr and told(first.stderr) == errors, first.stderr
    metas = [json.load(open(path)) for path in glob.glob(os.path.join(out, "metas", "*.json"))]
    assert len(metas) == 3 and {meta["status"] for meta in metas} == {"failed"}
    records = [json.load(open(path)) for path in glob.glob(os.path.join(out, "failures", "*.json"))]
    assert records and {(r["stage"], r["error_type"]) for r in records} == {("caption", "EngineStartError")}
    assert summary_count(first.stdout, "failures") == len(records)
    # exit 1: the summary's first line says the run broke, with the engine's error (the one line's reason)
    reason = re.sub(r" \(the clips it should have served .*$", "", errors[0][len("beam-captions: error: "):])
    assert re.fullmatch(r"beam-captions broke after \d+\.\d s: " + re.escape(reason), first.stdout.splitlines()[0]), \
        first.stdout
    assert "Traceback" in _log_text(out)  # the whole story is in the log file

    again = run_command(command, timeout=300)
    assert again.returncode == 1 and re.search(r"failed before 3\b", again.stdout), again.stdout
