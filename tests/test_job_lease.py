"""Issue 29, part 5: one writer per output on every runner. A second job on an output that a live job
holds is refused, on the portable runner (Beam's embedded job service, SDK worker in this process) as on
the DirectRunner; the Flex Template's launcher hands its lease to the job, whose workers keep it fresh
past its stated timeout, and whose last step gives it back."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from clips import make_clip

from beam_captions.cli import run_job
from beam_captions.io import lease as lease_module
from beam_captions.io.lease import holder_is_live

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("flex_main_for_leases", os.path.join(ROOT, "templates", "dataflow",
                                                                                    "flex_main.py"))
flex_main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flex_main)

PORTABLE = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]
SETTINGS = {"generate_previews": "true", "captioning_window_size": "16", "captioning_remainder_threshold": "8",
            "preview_target_height": "32", "preview_target_fps": "4"}


def cli_args(clips: str, out: str, *more: str) -> list[str]:
    flags = [f"--{name.replace('_', '-')}" if value == "true" else f"--{name.replace('_', '-')}={value}"
             for name, value in SETTINGS.items()]
    return ["--input", clips, "--output", out, *flags, "--no-gallery", *more]


def flex_args(clips: str, out: str, *more: str) -> list[str]:
    return [f"--input={clips}", f"--output={out}", *(f"--{k}={v}" for k, v in SETTINGS.items()), *more]


def lease_of(out: str):
    path = os.path.join(out, "_lease.json")
    return json.load(open(path)) if os.path.exists(path) else None


@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    make_clip(str(folder / "a.mp4"), 16, 10.0, 96, 64)
    return str(folder)


@pytest.fixture
def held_writes(monkeypatch):
    """Every clip write of a job in this process waits until the test lets it go."""
    import beam_captions.transforms.write as write

    entered, go = threading.Event(), threading.Event()
    real = write.write_clip

    def waiting(*args, **kwargs):
        entered.set()
        go.wait(timeout=60)
        return real(*args, **kwargs)

    monkeypatch.setattr(write, "write_clip", waiting)
    yield entered, go
    go.set()


def assert_refused(clips: str, out: str, runner: list[str], capsys) -> None:
    """A second job on ``out``, from ``beam-captions`` and from the Flex Template launcher: refused, nothing
    written, the lease left as it was."""
    before = lease_of(out)
    with pytest.raises(SystemExit) as refused:
        run_job(cli_args(clips, out, *runner))
    assert refused.value.code == 2 and "is in use by another run" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is in use by another run"):
        flex_main.main(flex_args(clips, out, *runner))
    assert lease_of(out)["token"] == before["token"]


def test_a_flex_template_job_holds_its_output_for_its_whole_life_on_the_portable_runner(
        tmp_path, clips, held_writes, monkeypatch, capsys):
    monkeypatch.setattr(lease_module, "REFRESH_S", 0.2)  # as the lease states it: its workers follow
    monkeypatch.setattr(lease_module, "JOB_STALE_S", 1.0)
    entered, go = held_writes
    out = str(tmp_path / "out")
    result = flex_main.main(flex_args(clips, out, *PORTABLE))  # submits and returns: the launcher is done
    launched = lease_of(out)
    assert launched["runs_in"] == "job" and launched["stale_s"] == 1.0
    assert entered.wait(timeout=60), "the job never reached its first write"
    time.sleep(1.5)  # past the stated timeout: only the job's own workers keep the lease live
    assert holder_is_live(lease_of(out)) and lease_of(out)["refreshed"] > launched["refreshed"] + 0.5
    assert_refused(clips, out, PORTABLE, capsys)
    go.set()
    assert result.wait_until_finish() == "DONE"
    assert lease_of(out) is None, "the job's last step gives the lease back"
    assert os.listdir(os.path.join(out, "previews"))


def test_a_second_job_is_refused_while_a_directrunner_job_holds_the_output(tmp_path, clips, capsys):
    """The first job runs ``beam-captions`` on the DirectRunner in its own process, held at its first write."""
    out = str(tmp_path / "out")
    entered, go = tmp_path / "entered", tmp_path / "go"
    script = (
        "import os, sys, time\n"
        "import beam_captions.transforms.write as write\n"
        "real = write.write_clip\n"
        "def waiting(*args, **kwargs):\n"
        "    open(sys.argv[1], 'w').close()\n"
        "    deadline = time.time() + 60\n"
        "    while not os.path.exists(sys.argv[2]) and time.time() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    return real(*args, **kwargs)\n"
        "write.write_clip = waiting\n"
        "from beam_captions.cli import run_job\n"
        "run_job(sys.argv[3:])\n"
    )
    first = subprocess.Popen([sys.executable, "-c", script, str(entered), str(go), *cli_args(clips, out)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not entered.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        assert lease_of(out)["pid"] == first.pid
        assert_refused(clips, out, [], capsys)
        go.touch()
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()
        first.wait()
    assert lease_of(out) is None
