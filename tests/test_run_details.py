"""Issue 23, point 5: the smaller points of a run's outputs and summary."""

from __future__ import annotations

import json
import os

import pytest
from clips import corrupt_packet_5, make_clip
from gcs import gcs  # noqa: F401  (module-scoped emulator fixture, started only by the tests that use it)

from beam_captions.cli import run_job
from beam_captions.records import clip_id_for


def previews_args(clips: str, out: str, *more: str) -> list[str]:
    return ["--input", clips, "--output", out, "--generate-previews", "--captioning-window-size", "16",
            "--captioning-remainder-threshold", "8", "--preview-target-height", "32", "--preview-target-fps", "4",
            "--no-gallery", *more]


def meta(out: str, source: str) -> dict:
    with open(os.path.join(out, "metas", f"{clip_id_for(source)}.json")) as handle:
        return json.load(handle)


def test_a_corrupt_clip_is_counted_once_per_warning_and_its_metas_say_so(tmp_path, capsys):
    """The clip is decoded twice (19 frames of 20 packets): its bad packet is met in both passes."""
    clips = tmp_path / "clips"
    clips.mkdir()
    bad = str(clips / "bad.avi")
    make_clip(bad, 20, 30, 64, 48, "mjpeg", "yuvj420p", edit_packet=corrupt_packet_5)
    out = str(tmp_path / "out")
    counts = run_job(previews_args(str(clips), out, "--preview-target-height", "48", "--preview-target-fps", "2"))
    assert counts["warnings_undecodable_packets"] == 1 and counts["warnings_decoded_twice"] == 1
    assert "1 clip with packets that could not be decoded" in capsys.readouterr().out
    warnings = meta(out, bad)["warnings"]
    assert "1 video packets could not be decoded" in warnings
    assert any(text.startswith("decoded 19 frames but demuxed 20 packets") for text in warnings)
    assert "1 of 20 frames could not be decoded (source frames 5-5)" in warnings
    assert len(warnings) == 3
    assert (meta(out, bad)["lost_frames"], meta(out, bad)["lost_frame_ranges"]) == (1, [[5, 5]])


def test_a_relative_output_is_recorded_as_absolute_paths(tmp_path, monkeypatch):
    """Rows and metas name previews by absolute paths: they stay right from any folder."""
    import pyarrow.parquet as pq

    from beam_captions.io.gallery import write_gallery

    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(str(clips / "a.mp4"), 24, 10.0, 96, 64)
    monkeypatch.chdir(tmp_path)
    run_job(previews_args("clips", "out"))
    out = str(tmp_path / "out")
    monkeypatch.chdir(clips)  # elsewhere
    rows = pq.read_table(os.path.join(out, "captions")).to_pylist()
    windows = meta(out, str(clips / "a.mp4"))["windows"]
    previews = [row["preview"] for row in rows] + [window["preview"] for window in windows]
    assert len(previews) == 4 and all(os.path.isabs(path) and os.path.isfile(path) for path in previews)
    assert all(path.startswith(os.path.join(out, "previews", "")) for path in previews)
    page = open(write_gallery(out)).read()  # the gallery's links stay relative to OUT
    assert f'src="previews/{clip_id_for(str(clips / "a.mp4"))}/0_15.webp"' in page


def test_output_locations_are_absolute_or_uris():
    from beam_captions.io.paths import absolute_location

    assert absolute_location("gs://bucket/out") == "gs://bucket/out"
    assert absolute_location("out") == os.path.join(os.getcwd(), "out")
    assert absolute_location("file:///data/out") == "/data/out"


@pytest.mark.parametrize("frames", [1, 2])
def test_a_previews_only_run_makes_previews_of_one_and_two_frame_clips(tmp_path, frames):
    from PIL import Image

    clips = tmp_path / "clips"
    clips.mkdir()
    short = str(clips / "short.mp4")
    make_clip(short, frames, 10.0, 96, 64)
    out = str(tmp_path / "out")
    counts = run_job(previews_args(str(clips), out))
    document = meta(out, short)
    assert counts.get("clips_failed", 0) == 0 and counts["previews"] == 1, document["errors"]
    assert document["status"] == "done" and document["num_frames"] == frames
    [window] = document["windows"]
    assert (window["start_frame"], window["end_frame"]) == (0, frames - 1)
    with Image.open(window["preview"]) as image:
        assert image.format == "WEBP" and image.height == 32


def test_captions_still_need_four_frames_and_previews_one(tmp_path):
    from beam_captions.inference.frame_bounds import DEFAULT_FRAME_BOUNDS
    from beam_captions.media.decode import DecodeError, PreviewSpec, decode_windows

    two = make_clip(str(tmp_path / "two.mp4"), 2, 10.0, 96, 64)
    with pytest.raises(DecodeError, match="at least 4 are needed for a caption window"):
        decode_windows(two, frame_size=DEFAULT_FRAME_BOUNDS.frame_size, preview=PreviewSpec(4.0, 32))
    info, [window] = decode_windows(two, model_frames=False, preview=PreviewSpec(4.0, 32))
    assert info.num_frames == 2 and window.frames is None and window.preview_frames.shape[0] == 1


def test_redone_clips_say_other_settings_or_outputs_missing(tmp_path, capsys):
    from beam_captions.summary import format_summary

    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(str(clips / "a.mp4"), 24, 10.0, 96, 64)
    make_clip(str(clips / "b.mp4"), 16, 10.0, 96, 64)
    out = str(tmp_path / "out")
    run_job(previews_args(str(clips), out))
    counts = run_job(previews_args(str(clips), out, "--preview-target-height", "48"))  # another preview height
    assert counts["clips_other_settings"] == 2 and not counts.get("clips_extended")
    assert "clips redone     2 (failed before 0, source replaced 0, made with other settings 2, outputs missing 0, " \
        "--no-skip-existing 0)" in capsys.readouterr().out
    text = format_summary({"clips_extended": 3}, out, 1.0)  # e.g. captions asked of a previews-only output
    assert "clips redone     3 (failed before 0, source replaced 0, made with other settings 0, outputs missing 3, " \
        "--no-skip-existing 0)" in text
    # --no-skip-existing redoes the finished clips, and the summary says so; a clip an earlier run did not
    # finish (here: its metas gone) is made, not redone
    os.unlink(os.path.join(out, "metas", f"{clip_id_for(str(clips / 'b.mp4'))}.json"))
    counts = run_job(previews_args(str(clips), out, "--preview-target-height", "48", "--no-skip-existing"))
    assert counts["clips_not_skipped"] == 1 and not counts.get("clips_skipped") and not counts.get("clips_other_settings")
    lines = capsys.readouterr().out.splitlines()
    assert "  clips skipped    0 (finished by an earlier run)" in lines
    assert "  clips redone     1 (failed before 0, source replaced 0, made with other settings 0, outputs missing 0, " \
        "--no-skip-existing 1)" in lines


def test_the_summary_s_first_line_says_how_the_run_ended(tmp_path):
    from beam_captions.summary import format_summary

    out = str(tmp_path / "out")
    assert format_summary({}, out, 29.46).splitlines()[0] == "beam-captions finished in 29.5 s"
    assert format_summary({}, out, 3.0, stopped=True).splitlines()[0] == "beam-captions stopped after 3.0 s"
    assert format_summary({}, out, 1.04, error="/out/metas/x.json: No space left on device").splitlines()[0] == \
        "beam-captions broke after 1.0 s: /out/metas/x.json: No space left on device"


@pytest.mark.parametrize("n, clips, commits, elements", [(1, "1 clip", "1 commit", "1 late element"),
                                                         (2, "2 clips", "2 commits", "2 late elements")])
def test_the_summary_s_counts_are_grammatical(tmp_path, n, clips, commits, elements):
    from beam_captions.summary import format_summary

    lines = format_summary({"delta_clips_committed": n, "delta_commits": n, "duplicates_dropped": n,
                            "warnings_preview_height": n}, str(tmp_path), 1.0).splitlines()
    assert f"  delta table      {clips} committed in {commits} (0 retried after a conflict)" in lines
    assert f"  duplicates       {elements} of written clips dropped" in lines
    assert f"  warnings         {n} {'clip' if n == 1 else 'clips'} below the preview height" in lines


def test_the_summary_names_only_the_output_folders_that_exist(tmp_path, capsys):
    from beam_captions.summary import format_summary

    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(str(clips / "a.mp4"), 24, 10.0, 96, 64)
    out = str(tmp_path / "out")
    run_job(previews_args(str(clips), out))  # no failure: no failures/ folder
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("outputs")]
    assert line == f"  outputs          {out}  (captions/ previews/ metas/)"
    assert format_summary({}, str(tmp_path / "none"), 1.0).endswith(f"{tmp_path / 'none'}  (nothing written)")
    assert "(captions/ failures/)" in format_summary({}, "gs://b/o", 1.0, folders=["captions", "failures"])


def test_output_folders_on_gs_are_those_holding_objects(gcs):  # noqa: F811
    from beam_captions.summary import output_folders

    gcs.create_bucket("folders")
    gcs.upload_bytes(b"{}", "gs://folders/run/metas/x.json")
    gcs.upload_bytes(b"p", "gs://folders/run/captions/x.parquet")
    gcs.upload_bytes(b"o", "gs://folders/run-other/failures/x.json")  # another output, same prefix
    assert output_folders("gs://folders/run") == ["captions", "metas"]


def write_lease(out: str, **fields) -> None:
    import socket
    import time

    os.makedirs(out, exist_ok=True)
    document = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01 00:00:00",
                "refreshed": time.time(), "token": "theirs", **fields}
    with open(os.path.join(out, "_lease.json"), "w") as handle:
        json.dump(document, handle)


@pytest.fixture
def one_clip(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(str(clips / "a.mp4"), 16, 10.0, 96, 64)
    return str(clips)


def test_a_run_on_an_output_a_live_run_holds_is_refused_in_one_line(tmp_path, one_clip, other_process, capsys):
    out = str(tmp_path / "out")
    write_lease(out, pid=other_process)
    with pytest.raises(SystemExit) as stopped:
        run_job(previews_args(one_clip, out))
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is in use by another run" in error and f"PID {other_process}" in error
    assert "--force" in error
    assert not os.path.exists(os.path.join(out, "metas")) and not os.path.exists(os.path.join(out, "logs"))
    assert json.load(open(os.path.join(out, "_lease.json")))["token"] == "theirs"  # left as it was


def test_force_runs_anyway_and_says_so(tmp_path, one_clip, other_process, capsys):
    out = str(tmp_path / "out")
    write_lease(out, pid=other_process)
    counts = run_job(previews_args(one_clip, out, "--force"))
    assert counts["previews"] == 1
    assert "--force" in capsys.readouterr().err
    lease = json.load(open(os.path.join(out, "_lease.json")))  # the other run still holds it: never removed
    assert lease["token"] == "theirs" and "others" not in lease


@pytest.mark.parametrize("holder", ["dead PID here", "old on another host", "torn"])
def test_a_stale_lease_is_taken_over(tmp_path, one_clip, capsys, holder):
    import subprocess
    import sys
    import time

    out = str(tmp_path / "out")
    if holder == "dead PID here":
        done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        write_lease(out, pid=int(done.stdout))
    elif holder == "old on another host":
        write_lease(out, host="elsewhere", refreshed=time.time() - 3600)
    else:
        os.makedirs(out)
        open(os.path.join(out, "_lease.json"), "w").write('{"host": ')
    counts = run_job(previews_args(one_clip, out))
    assert counts["previews"] == 1 and capsys.readouterr().err.count("\n") <= 1  # at most the progress line
    assert not os.path.exists(os.path.join(out, "_lease.json"))


def test_the_lease_names_the_run_while_it_runs_and_is_refreshed(tmp_path, monkeypatch):
    import socket
    import time

    from beam_captions.io.lease import Lease, LeaseHeld

    out = str(tmp_path / "out")
    lease = Lease.take(out, refresh_s=0.05)
    try:
        document = json.load(open(os.path.join(out, "_lease.json")))
        assert (document["host"], document["pid"]) == (socket.gethostname(), os.getpid())
        first = document["refreshed"]
        time.sleep(0.3)
        assert json.load(open(os.path.join(out, "_lease.json")))["refreshed"] > first
        write_lease(out, host="elsewhere")  # a run elsewhere holds it now (forced): this one stops refreshing
        time.sleep(0.3)
        assert lease.lost and json.load(open(os.path.join(out, "_lease.json")))["host"] == "elsewhere"
        with pytest.raises(LeaseHeld, match="host elsewhere"):
            Lease.take(out)
    finally:
        lease.release()
    assert os.path.exists(os.path.join(out, "_lease.json"))  # not this run's: left alone


def test_a_lease_on_gs_is_an_object(gcs):  # noqa: F811
    import time

    from beam_captions.io.lease import Lease, LeaseHeld

    gcs.create_bucket("leases")
    out = "gs://leases/run"
    first = Lease.take(out)
    assert gcs.exists("gs://leases/run/_lease.json")
    gcs.upload_bytes(json.dumps({"host": "elsewhere", "pid": 7, "refreshed": time.time(), "token": "x"}).encode(),
                     "gs://leases/run/_lease.json")
    with pytest.raises(LeaseHeld, match="host elsewhere, PID 7"):
        Lease.take(out)
    first.release()  # not its lease any more: left alone
    gcs.upload_bytes(json.dumps({"host": "elsewhere", "pid": 7, "refreshed": time.time() - 3600, "token": "x"}).encode(),
                     "gs://leases/run/_lease.json")
    second = Lease.take(out)  # stale: taken over
    assert second.displaced["token"] == "x"
    second.release()
    assert not gcs.exists("gs://leases/run/_lease.json")


def test_compact_runs_beside_a_live_run_and_says_so(tmp_path, one_clip, other_process, capsys):
    from beam_captions.cli import compact

    out = str(tmp_path / "out")
    run_job(previews_args(one_clip, out))
    write_lease(out, pid=other_process)
    counts = compact([out])
    assert "a run is writing to" in capsys.readouterr().out and counts["files_after"] == 1
