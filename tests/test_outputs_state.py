"""Finished, failed and replaced are different things (issue 14, section 2): metas say status, source
version and outputs; --skip-existing skips only what is done for the outputs asked, from an unchanged source."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
from clips import make_clip

from beam_captions.cli import run_job
from beam_captions.records import clip_id_for
from conftest import VLLM_KWARGS


def previews_args(clips: str, out: str) -> list[str]:
    return ["--input", clips, "--output", out, "--generate-previews", "--captioning-window-size", "16",
            "--captioning-remainder-threshold", "8", "--preview-target-height", "32", "--preview-target-fps", "4"]


def meta(out: str, source: str) -> dict:
    return json.load(open(os.path.join(out, "metas", f"{clip_id_for(source)}.json")))


def failures_of(out: str, source: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "failures", f"{clip_id_for(source)}_*")))


def previews_of(out: str, source: str) -> list[str]:
    return sorted(os.listdir(os.path.join(out, "previews", clip_id_for(source))))


def rows_of(out: str, source: str) -> list[dict]:
    return [r for r in pq.read_table(os.path.join(out, "captions")).to_pylist() if r["clip_id"] == clip_id_for(source)]


@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    make_clip(str(folder / "a.mp4"), 40, 10.0, 96, 64)
    make_clip(str(folder / "b.mp4"), 24, 10.0, 96, 64)
    (folder / "broken.mp4").write_bytes(b"\x00" * 100)
    return folder


def test_metas_say_status_source_version_and_outputs(tmp_path, clips):
    out = str(tmp_path / "out")
    run_job(previews_args(str(clips), out))
    good, broken = meta(out, str(clips / "a.mp4")), meta(out, str(clips / "broken.mp4"))
    assert good["version"] == 2 and good["status"] == "done" and broken["status"] == "failed"
    stat = os.stat(clips / "a.mp4")
    assert good["source_version"] == {"size": stat.st_size, "modified": stat.st_mtime}
    assert good["outputs"] == {"previews": {"window_size": 16, "remainder_threshold": 8, "fps": 4.0, "height": 32,
                                            "quality": 50, "compression_level": 6}}
    assert good["captions_file"] == f"captions/{clip_id_for(str(clips / 'a.mp4'))}.parquet"


def test_failed_clips_are_retried_unless_no_retry_failed(tmp_path, clips):
    out = str(tmp_path / "out")
    run_job(previews_args(str(clips), out))
    counts = run_job(previews_args(str(clips), out))
    assert counts["clips_skipped"] == 2 and counts["clips_retried"] == 1 and counts["failures_prepare"] == 1
    counts = run_job(previews_args(str(clips), out) + ["--no-retry-failed"])
    assert counts["clips_skipped"] == 3 and counts.get("clips", 0) == 0


def test_a_clip_that_now_succeeds_loses_its_stale_failure_records(tmp_path, clips):
    out, broken = str(tmp_path / "out"), str(clips / "broken.mp4")
    run_job(previews_args(str(clips), out))
    assert failures_of(out, broken) == [f"{clip_id_for(broken)}_clip_prepare.json"]
    make_clip(broken, 26, 10.0, 96, 64)  # fixed in place under the same name
    counts = run_job(previews_args(str(clips), out))
    assert counts["clips_skipped"] == 2 and counts.get("failures_prepare", 0) == 0
    assert meta(out, broken)["status"] == "done" and failures_of(out, broken) == []
    assert [r["window_index"] for r in rows_of(out, broken)] == [0, 1]


def test_a_replaced_file_is_redone_and_its_old_rows_and_previews_replaced(tmp_path, clips):
    out, source = str(tmp_path / "out"), str(clips / "a.mp4")
    run_job(previews_args(str(clips), out))
    assert len(previews_of(out, source)) == 3 and len(rows_of(out, source)) == 3
    make_clip(source, 26, 10.0, 96, 64)  # a shorter clip under the same name: two windows
    counts = run_job(previews_args(str(clips), out) + ["--no-retry-failed"])
    assert counts["clips_replaced"] == 1 and counts["clips_skipped"] == 2
    assert previews_of(out, source) == ["0_15.webp", "16_25.webp"]
    assert [(r["window_index"], r["end_frame"]) for r in rows_of(out, source)] == [(0, 15), (1, 25)]
    document = meta(out, source)
    assert document["source_version"]["size"] == os.path.getsize(source) and len(document["windows"]) == 2


def test_a_run_that_makes_nothing_is_refused_with_one_line(tmp_path, clips, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_job(["--input", str(clips), "--output", str(tmp_path / "out")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--generate-captions" in error and "--generate-previews" in error
    assert not os.path.exists(tmp_path / "out")


def test_captions_asked_of_a_previews_only_output_are_made_and_the_previews_kept(tmp_path, clips, captioner_dir):
    out = str(tmp_path / "out")
    shutil.move(str(clips / "broken.mp4"), str(tmp_path / "broken.mp4"))
    run_job(previews_args(str(clips), out))
    previews_before = {s: previews_of(out, str(clips / s)) for s in ("a.mp4", "b.mp4")}
    captions = ["--input", str(clips), "--output", out, "--generate-captions", "--model-dir", captioner_dir,
                "--vllm-kwargs", json.dumps(VLLM_KWARGS), "--captioning-window-size", "16",
                "--captioning-remainder-threshold", "8", "--captioning-max-output-tokens", "4"]
    counts = run_job(captions, release_models=False)
    assert counts.get("clips_skipped", 0) == 0 and counts["clips_extended"] == 2
    assert counts["captions"] == counts["windows"] == 5
    for name in ("a.mp4", "b.mp4"):
        source = str(clips / name)
        assert previews_of(out, source) == previews_before[name]
        rows = rows_of(out, source)
        assert rows and all(r["caption"] is not None and r["preview"] and os.path.isfile(r["preview"]) for r in rows)
        document = meta(out, source)
        assert set(document["outputs"]) == {"previews", "captions"} and document["status"] == "done"
        assert document["outputs"]["captions"]["model"] == captioner_dir
    both = captions + ["--generate-previews", "--preview-target-height", "32", "--preview-target-fps", "4"]
    counts = run_job(both, release_models=False)
    assert counts["clips_skipped"] == 2 and counts.get("clips", 0) == 0
    counts = run_job(captions + ["--captioning-prompt-text", "Say one word."], release_models=False)
    assert counts["clips_other_settings"] == 2 and not counts.get("clips_extended")  # another prompt: captions
    # redone, previews still kept
    assert all(r["preview"] for name in ("a.mp4", "b.mp4") for r in rows_of(out, str(clips / name)))


def window_record(source: str, index: int, version, **fields):
    from beam_captions.records import WindowRecord

    return WindowRecord(clip_id_for(source), source, index, index * 16, index * 16 + 15, index * 1.6, index * 1.6 + 1.6,
                        (index * 16, index * 16 + 15), source_version=version, **fields)


def info(source: str, windows: int, version):
    from beam_captions.records import ClipInfo

    return ClipInfo(clip_id_for(source), source, 96, 64, 10.0, windows * 16, "h264", windows * 1.6, windows,
                    source_version=version)


def test_a_previews_run_keeps_the_captions_of_the_same_version_and_never_mixes_in_another(tmp_path):
    from beam_captions.io.clip_output import write_clip

    out, source = str(tmp_path), "/videos/a.mp4"
    captions, previews = {"captions": {"model": "m"}}, {"previews": {"height": 32}}
    write_clip(out, clip_id_for(source), [window_record(source, i, (10, 1.0), caption=f"c{i}", caption_model="m")
                                          for i in range(2)] + [info(source, 2, (10, 1.0))], asked=captions)
    write_clip(out, clip_id_for(source), [window_record(source, i, (10, 1.0), preview_uri=f"{out}/p{i}.webp")
                                          for i in range(2)] + [info(source, 2, (10, 1.0))], asked=previews)
    rows = rows_of(out, source)
    assert [(r["caption"], r["caption_model"], r["preview"]) for r in rows] == [
        ("c0", "m", f"{out}/p0.webp"), ("c1", "m", f"{out}/p1.webp")]
    assert meta(out, source)["outputs"] == {**captions, **previews}
    # the source changed: nothing of the old version is kept
    write_clip(out, clip_id_for(source), [window_record(source, 0, (11, 2.0), preview_uri=f"{out}/p0.webp"),
                                          info(source, 1, (11, 2.0))], asked=previews)
    assert [(r["caption"], r["preview"]) for r in rows_of(out, source)] == [(None, f"{out}/p0.webp")]
    assert meta(out, source)["outputs"] == previews


def test_an_incomplete_write_never_replaces_a_done_clip_of_the_same_version(tmp_path):
    from beam_captions.records import Failure
    from beam_captions.io.clip_output import write_clip

    out, source, asked = str(tmp_path), "/videos/a.mp4", {"captions": {"model": "m"}}
    complete = [window_record(source, i, (10, 1.0), caption=f"c{i}") for i in range(2)] + [info(source, 2, (10, 1.0))]
    assert write_clip(out, clip_id_for(source), complete, asked=asked)
    before = open(os.path.join(out, "metas", f"{clip_id_for(source)}.json"), "rb").read()
    late = [window_record(source, 0, (10, 1.0), caption="late"),
            Failure(source, clip_id_for(source), "write", "RuntimeError", "incomplete")]
    assert not write_clip(out, clip_id_for(source), late, asked=asked)
    assert open(os.path.join(out, "metas", f"{clip_id_for(source)}.json"), "rb").read() == before
    assert failures_of(out, source) == [] and [r["caption"] for r in rows_of(out, source)] == ["c0", "c1"]
    # a new version of the source is not a duplicate: its result is written, failed or not
    assert write_clip(out, clip_id_for(source), [window_record(source, 0, (12, 3.0), caption="new"),
                                                 Failure(source, clip_id_for(source), "write", "E", "m")], asked=asked)
    assert meta(out, source)["status"] == "failed" and failures_of(out, source)
