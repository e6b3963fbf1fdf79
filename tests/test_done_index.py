"""The done check reads what is done once per run (issue 29, part 2): one listing of ``OUT/metas`` and of
the done index ``OUT/done``; a metas is read only where the index says to look closer, and the metas
decides wherever the two disagree. Also: a scan leaves out an output inside its input (part 7).

No decoding and no model here: the outputs are written by the real writer (``write_clip``), the clips are
files of a few bytes, and the job is ``ReadClips | SkipFinishedClips`` on the DirectRunner.
"""

from __future__ import annotations

import os
import shutil

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_captions.io.clip_output import write_clip
from beam_captions.io.compaction import list_caption_files, merge_group, plan_groups
from beam_captions.metrics import counters
from beam_captions.records import ClipInfo, Failure, WindowRecord, clip_id_for
from beam_captions.transforms import skip_finished
from beam_captions.transforms.read import InputError, ReadClips, check_inputs, list_found
from beam_captions.transforms.skip_finished import SkipFinishedClips

CAPTIONS = {"captions": {"model": "m", "window_size": 16}}
PREVIEWS = {"previews": {"height": 32}}
CLIPS = 12
KEPT: list[str] = []  # the sources that went on, in the last ``run`` (the DoFn's function is looked up here)


def _keep(clip) -> None:
    KEPT.append(clip.source)


def write_done(out: str, source: str, version, asked: dict, failed: bool = False) -> None:
    """The clip's files as a finished run leaves them (one captioned window; a failure record if ``failed``)."""
    clip_id = clip_id_for(source)
    window = WindowRecord(clip_id, source, 0, 0, 15, 0.0, 1.6, (0, 15), caption="c", caption_model="m",
                          preview_uri="p.webp", source_version=version)
    info = ClipInfo(clip_id, source, 96, 64, 10.0, 16, "h264", 1.6, 1, source_version=version)
    extra = [Failure(source, clip_id, "caption", "ValueError", "refused", 0)] if failed else []
    assert write_clip(out, clip_id, [window, info, *extra], asked=asked)


@pytest.fixture
def finished(tmp_path):
    """``CLIPS`` clips in ``in/``, each finished (captions and previews) in ``in/out`` (an output inside its
    input); returns (input folder, output, {source: version})."""
    folder, out = tmp_path / "in", tmp_path / "in" / "out"
    folder.mkdir()
    for i in range(CLIPS):
        (folder / f"clip{i:02d}.mp4").write_bytes(b"x" * (10 + i))
    versions = {found.path: found.version for found in list_found(str(folder))}
    for source, version in versions.items():
        write_done(str(out), source, version, {**CAPTIONS, **PREVIEWS})
    return str(folder), str(out), versions


def run(inputs, out: str, asked: dict, monkeypatch, retry_failed: bool = True, extensions=None):
    """``ReadClips | SkipFinishedClips`` once: (counters, sources that go on, clip ids whose metas was read)."""
    reads: list[str] = []
    read_meta = skip_finished.read_meta

    def counted(output, clip_id):
        reads.append(clip_id)
        return read_meta(output, clip_id)

    monkeypatch.setattr(skip_finished, "read_meta", counted)
    pipeline = beam.Pipeline(options=PipelineOptions(["--direct_num_workers", "1"]))
    KEPT.clear()
    (pipeline
     | ReadClips(inputs, extensions, exclude=out)
     | SkipFinishedClips(out, asked, retry_failed=retry_failed)
     | beam.Map(_keep))
    result = pipeline.run()
    result.wait_until_finish()
    return counters(result), sorted(KEPT), reads


def test_a_rerun_of_a_finished_output_reads_no_metas(finished, monkeypatch):
    folder, out, versions = finished
    counts, kept, reads = run(folder, out, CAPTIONS, monkeypatch)  # a subset of what each clip has
    assert counts["clips_skipped"] == CLIPS and kept == [] and reads == []
    counts, kept, reads = run(folder, out, {**CAPTIONS, **PREVIEWS}, monkeypatch)
    assert counts["clips_skipped"] == CLIPS and reads == []


def test_where_index_and_metas_disagree_the_metas_decides(finished, monkeypatch):
    folder, out, versions = finished
    sources = sorted(versions)
    truncated, deleted, replaced, failed = sources[:4]
    metas = os.path.join(out, "metas")
    with open(os.path.join(metas, f"{clip_id_for(truncated)}.json"), "r+b") as handle:  # a partial copy
        handle.truncate(40)
    os.remove(os.path.join(metas, f"{clip_id_for(deleted)}.json"))  # its marker stays
    with open(replaced, "wb") as handle:
        handle.write(b"y" * 99)  # new bytes: the listing gives another version
    os.remove(os.path.join(metas, f"{clip_id_for(failed)}.json"))
    write_done(out, failed, versions[failed], CAPTIONS, failed=True)
    counts, kept, reads = run(folder, out, CAPTIONS, monkeypatch)
    assert kept == sorted([truncated, deleted, replaced, failed])
    assert sorted(reads) == sorted(clip_id_for(s) for s in (truncated, replaced, failed))  # no metas: nothing to read
    assert counts["clips_skipped"] == CLIPS - 4 and counts["clips_replaced"] == 1 and counts["clips_retried"] == 1
    counts, kept, reads = run(folder, out, CAPTIONS, monkeypatch, retry_failed=False)
    assert failed not in kept and clip_id_for(failed) not in reads  # its marker says failed: finished for this run
    counts, kept, reads = run(folder, out, {**CAPTIONS, "stage2": {"prompt_text": "more"}}, monkeypatch)
    assert counts["clips_extended"] == CLIPS - 4  # an output the index has no digest of: read, and made


def test_an_output_without_an_index_is_read_once_then_indexed(finished, monkeypatch):
    folder, out, _ = finished
    shutil.rmtree(os.path.join(out, "done"))  # as an older release left it
    counts, kept, reads = run(folder, out, CAPTIONS, monkeypatch)
    assert counts["clips_skipped"] == CLIPS and len(reads) == CLIPS
    assert len(os.listdir(os.path.join(out, "done"))) == CLIPS
    counts, kept, reads = run(folder, out, CAPTIONS, monkeypatch)
    assert counts["clips_skipped"] == CLIPS and reads == []


def test_compaction_keeps_the_index(finished, monkeypatch):
    folder, out, _ = finished
    [group] = plan_groups(list_caption_files(out), 2**30)
    merge_group(out, group)  # re-points every metas at the merged file: each metas changes size
    counts, kept, reads = run(folder, out, CAPTIONS, monkeypatch)
    assert counts["clips_skipped"] == CLIPS and reads == []


def test_a_scan_leaves_out_an_output_inside_it_and_an_input_inside_the_output_is_refused(finished, monkeypatch):
    folder, out, versions = finished
    for name in ("_lease.json", "run.log"):
        with open(os.path.join(out, name), "w") as handle:
            handle.write("{}")
    counts, kept, _ = run(folder, out, CAPTIONS, monkeypatch, extensions={"*"})
    assert counts["clips_found"] == CLIPS and counts["clips_skipped"] == CLIPS
    with pytest.raises(InputError, match=r"inside --output"):
        check_inputs([os.path.join(out, "metas")], output=out)
    with pytest.raises(InputError, match=r"inside --output"):
        check_inputs([os.path.join(out, "*.json")], output=out)
    check_inputs([folder], output=out)  # the output inside the input: the scan leaves it out
