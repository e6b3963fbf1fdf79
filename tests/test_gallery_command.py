"""``beam-captions gallery OUT`` on a local folder and on an emulated bucket; ``--no-gallery``; gs:// source versions."""

from __future__ import annotations

import json
import os

from clips import make_clip
from gcs import gcs  # noqa: F401  (the module-scoped fixture)

from beam_captions.cli import main, run_job
from beam_captions.io import files
from beam_captions.transforms.write import source_version


def clip_meta(number: int) -> dict:
    clip_id = f"00000000-0000-0000-0000-{number:012d}"
    return {"version": 2, "clip_id": clip_id, "source": f"gs://in-bucket/raw/clip-{number:04d}.mp4", "status": "done",
            "width": 64, "height": 48, "fps": 10.0, "num_frames": 20, "codec": "h264", "duration_s": 2.0,
            "warnings": [], "errors": [],
            "windows": [{"window_index": 0, "start_frame": 0, "end_frame": 19, "start_s": 0.0, "end_s": 2.0,
                         "sampled_frames": [0, 19], "caption": f"caption of clip {number}", "preview": None}]}


def test_the_gallery_command_builds_pages_from_a_bucket_reading_metas_on_threads(gcs, monkeypatch, capsys):  # noqa: F811
    gcs.create_bucket("gallery-bucket")
    out = "gs://gallery-bucket/run"
    for number in range(120):
        gcs.upload_bytes(json.dumps(clip_meta(number)).encode(), f"{out}/metas/{clip_meta(number)['clip_id']}.json")
    gcs.upload_bytes(json.dumps({"source": "gs://in-bucket/raw/bad.mp4", "clip_id": None, "stage": "prepare",
                                 "error_type": "ValueError", "message": "not a video", "window_index": None}).encode(),
                     f"{out}/failures/x_clip_prepare.json")
    threads = []
    executor = files.ThreadPoolExecutor

    def recording(*args, **kwargs):
        threads.append(kwargs.get("max_workers"))
        return executor(*args, **kwargs)

    monkeypatch.setattr(files, "ThreadPoolExecutor", recording)
    assert main(["gallery", out]) == 0
    assert capsys.readouterr().out.startswith(f"{out}/index.html")
    assert max(threads) == 16
    objects = gcs.list(f"{out}/")
    assert {f"{out}/index.html", f"{out}/index-2.html", f"{out}/index-3.html"} <= set(objects)
    pages = "".join(gcs.read(f"{out}/{name}").decode() for name in ("index.html", "index-2.html", "index-3.html"))
    assert all(f"caption of clip {n}<" in pages for n in range(120)) and "not a video" in pages


def test_the_gallery_command_on_a_local_output_and_no_gallery_for_a_run(tmp_path):
    clips, out = tmp_path / "clips", tmp_path / "out"
    clips.mkdir()
    make_clip(str(clips / "a.mp4"), 20, 10.0, 96, 64)
    counts = run_job(["--input", str(clips), "--output", str(out), "--generate-previews", "--no-gallery",
                      "--preview-target-height", "16"])
    assert counts["clips"] == 1 and not os.path.exists(out / "index.html")
    assert main(["gallery", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert page.count('<div class="window"') == 1 and "a.mp4" in page


def test_a_gs_source_version_is_its_size_and_update_time_and_changes_with_a_new_upload(gcs, tmp_path):  # noqa: F811
    gcs.create_bucket("version-bucket")
    uri = "gs://version-bucket/raw/a.mp4"
    gcs.upload_bytes(b"x" * 10, uri)
    first = source_version(uri)
    assert first is not None and first[0] == 10 and first[1] > 0
    gcs.upload_bytes(b"y" * 12, uri)
    assert source_version(uri)[0] == 12 and source_version("gs://version-bucket/raw/missing.mp4") is None
