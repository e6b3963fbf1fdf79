"""The audit of a run's summary against its output: every number the summary prints (and every counter
``run_job`` returns) must be what the disk holds, or the table ``read_captions`` reads.

What a run wrote is what changed on disk while it ran: ``snapshot(OUT)`` before, the output after. A clip
written by the run is one whose metas changed; its windows, captions, flags and prompt tokens are in that
metas; its previews and failure records are the files that changed. A run that finished (or broke after
its pipeline ran) must match the disk exactly; a stopped run must add up (its clips may still have been
in flight when the summary was printed). Every output, whatever ended it, must agree with its table: each
clip's rows in ``read_captions`` are its metas' windows.

``audit_every_run()`` (``conftest.py``) wraps ``beam_captions.cli.run_job``, which ``main`` calls too, so
every run a test makes in this process is audited; a test that runs the command line in a subprocess calls
``snapshot`` and ``audit`` itself. The cost is a listing of metas, failures and previews, the metas read
twice and one ``read_captions``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import glob
import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

__all__ = ["Disk", "audit", "audit_every_run", "damaged_output", "run_command", "snapshot"]

Stamp = tuple
_KINDS = ("caption", "caption_stage2", "enhanced_caption")
_FILES = (("metas", "*.json"), ("failures", "*.json"), ("previews", "*/*.webp"))


@dataclass(frozen=True)
class Disk:
    """What an output holds: the stamp of each metas, failure record and preview (by its path under the
    output: a rewrite changes it), and the metas and failure records read (``None``: unreadable)."""

    stamps: dict[str, Stamp] = field(default_factory=dict)
    documents: dict[str, Optional[dict]] = field(default_factory=dict)

    def changed(self, before: "Disk", folder: str) -> list[str]:
        """The files under ``folder`` that are new or rewritten since ``before``."""
        return sorted(path for path, stamp in self.stamps.items()
                      if path.startswith(f"{folder}/") and before.stamps.get(path) != stamp)

    def metas(self) -> dict[str, Optional[dict]]:
        """Every clip's metas (``None``: unreadable), by clip id."""
        return {path[len("metas/"):-len(".json")]: document for path, document in self.documents.items()
                if path.startswith("metas/")}


def _listing(output: str, folder: str, pattern: str) -> dict[str, Stamp]:
    """``{path under output: stamp}`` of the files ``folder/pattern``; locally the stamp holds the inode, so a
    file replaced by the same bytes (a whole-file write) counts as rewritten."""
    from apache_beam.io.filesystems import FileSystems

    from beam_captions.io.paths import is_local, local_path

    if is_local(output):
        root = local_path(output)
        found = {}
        for path in glob.glob(os.path.join(root, folder, *pattern.split("/"))):  # names starting "." left out
            found[os.path.relpath(path, root).replace(os.sep, "/")] = (os.stat(path).st_ino, os.stat(path).st_mtime_ns,
                                                                       os.stat(path).st_size)
        return found
    matched = FileSystems.match([FileSystems.join(output, folder, pattern)])[0].metadata_list
    return {m.path[len(output.rstrip("/")) + 1:]: (m.size_in_bytes, m.last_updated_in_seconds) for m in matched}


def _read(path: str) -> Optional[dict]:
    from beam_captions.io.files import read_json

    try:
        document = read_json(path)
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def snapshot(output: str) -> Disk:
    """The metas, failure records (both read) and previews of ``output``."""
    from apache_beam.io.filesystems import FileSystems

    from beam_captions.io.files import parallel_map

    stamps = {path: stamp for folder, pattern in _FILES for path, stamp in _listing(output, folder, pattern).items()}
    documents = sorted(path for path in stamps if path.endswith(".json"))
    read = parallel_map(lambda path: _read(FileSystems.join(output, *path.split("/"))), documents)
    return Disk(stamps, dict(zip(documents, read)))


_SKIP_TABLE = threading.local()


@contextlib.contextmanager
def damaged_output() -> Iterator[None]:
    """Runs on an output damaged on purpose (tests of bad outputs): the audit leaves out its table."""
    _SKIP_TABLE.on = True
    try:
        yield
    finally:
        _SKIP_TABLE.on = False


@dataclass
class Summary:
    """The numbers a run's summary printed, by line."""

    ended: str  # finished, stopped or broke
    numbers: dict[str, int]
    parts: dict[str, dict[str, int]]  # a line's parenthesised counts: windows, redone, failures, flagged
    folders: Optional[list[str]]


def parse_summary(text: str) -> Summary:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"beam-captions (finished|stopped|broke) ", line)),
                 None)
    assert start is not None, f"no summary in:\n{text}"
    ended = lines[start].split()[1]
    numbers, parts, folders = {}, {}, None
    for line in lines[start + 1:]:
        if not re.match(r"  [a-z]", line):
            break
        name, rest = line[2:19].strip(), line[19:]  # the labels' column is 17 characters wide
        if name == "outputs":
            listed = re.search(r" {2}\(([^)]*)\)$", rest)
            folders = [] if listed is None or listed.group(1) == "nothing written" else \
                [folder.rstrip("/") for folder in listed.group(1).split()]
            continue
        if name == "flagged captions":
            parts[name] = {} if rest == "none" else {flag: int(n) for flag, n in re.findall(r"(\w+) (\d+)", rest)}
            continue
        if name == "delta table":
            committed = re.match(r"(\d+) clips? committed in (\d+) commits?", rest)
            numbers["delta clips committed"], numbers["delta commits"] = map(int, committed.groups())
            continue
        head = re.match(r"(\d+)(?: \((.*)\))?", rest)
        if head is None:
            continue
        numbers[name] = int(head.group(1))
        inside = head.group(2) or ""
        if name == "windows":  # 5 (3 captioned, 1 failed, 1 not reached)
            parts[name] = {what: int(n) for n, what in re.findall(r"(\d+) ([a-z ]+?)(?=,|$)", inside)}
        elif name in ("clips redone", "failures"):  # 2 (failed before 1, ...), 3 (caption 2, prepare 1)
            parts[name] = {what: int(n) for what, n in re.findall(r"([a-z-][a-z -]*?) (\d+)(?=,|$)", inside)}
    return Summary(ended, numbers, parts, folders)


@dataclass
class OnDisk:
    """What the run wrote, read back from the disk."""

    written: int = 0
    failed: int = 0
    windows: int = 0
    captioned: int = 0
    prompt_tokens: int = 0
    caption_ok: int = 0  # captioned, no caption failure on the window: the progress line's ``captioned``
    caption_failed: int = 0  # windows with a caption failure
    flags: collections.Counter = field(default_factory=collections.Counter)
    previews: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)
    redone: int = 0
    retried: int = 0
    staged: int = 0
    unchanged: int = 0


def _on_disk(before: Disk, after: Disk) -> OnDisk:
    seen = OnDisk()
    for path in after.changed(before, "metas"):
        meta, old = after.documents[path], before.documents.get(path)
        assert meta is not None, f"{path} unreadable after the run"
        seen.written += 1
        seen.failed += meta.get("status") == "failed"
        if old is not None:
            seen.redone += 1
            seen.retried += old.get("status") == "failed" and old.get("source_version") == meta.get("source_version")
        seen.staged += bool(meta.get("captions_staged"))
        failed_windows = {e.get("window_index") for e in meta.get("errors") or [] if e.get("stage") == "caption"}
        for window in meta.get("windows") or []:
            seen.windows += 1
            if window.get("caption"):
                seen.captioned += 1
                seen.prompt_tokens += window.get("caption_prompt_tokens") or 0
                seen.caption_ok += window.get("window_index") not in failed_windows
            seen.caption_failed += window.get("window_index") in failed_windows
            for kind in _KINDS:
                seen.flags.update(window.get(f"{kind}_flags") or [])
    seen.unchanged = len(after.metas()) - seen.written
    seen.previews = len(after.changed(before, "previews"))
    for path in after.changed(before, "failures"):
        record = after.documents[path]
        assert record is not None, f"failure record {path} unreadable after the run"
        seen.failures[record.get("stage")] += 1
    return seen


def _check_table(output: str, after: Disk) -> None:
    """Each clip's rows in ``read_captions`` are its metas' windows (and its captions, its captioned ones)."""
    from beam_captions.io.read_captions import has_output, read_captions

    if not has_output(output):
        return
    table = read_captions(output, ["clip_id", "caption"])
    rows, captioned = collections.Counter(), collections.Counter()
    for clip_id, caption in zip(table.column("clip_id").to_pylist(), table.column("caption").to_pylist()):
        rows[clip_id] += 1
        captioned[clip_id] += bool(caption)
    metas = {clip_id: meta for clip_id, meta in after.metas().items() if meta is not None}
    assert set(rows) <= set(metas), f"rows of clips without metas: {sorted(set(rows) - set(metas))}"
    for clip_id, meta in metas.items():
        if meta.get("captions_staged") and os.path.exists(os.path.join(output, meta["captions_staged"])):
            continue  # a Delta clip not committed yet (a stopped run): the table has its earlier rows, or none
        windows = meta.get("windows") or []
        expected = len(windows) if meta.get("captions_file") or meta.get("captions_table") == "delta" else 0
        assert rows[clip_id] == expected, f"clip {clip_id}: {rows[clip_id]} rows in the table, its metas has {expected}"
        assert captioned[clip_id] == (sum(bool(w.get("caption")) for w in windows) if expected else 0), clip_id


def audit(output: str, summary: str, counts: Optional[dict[str, int]] = None, before: Optional[Disk] = None,
          progress: Optional[dict[str, int]] = None) -> None:
    """Check the printed ``summary`` (and ``counts``, the counters it was made from, and ``progress``, the
    live progress counters, when known) against ``output``; ``before``: the output before the run."""
    from apache_beam.io.filesystems import FileSystems

    from beam_captions.summary import output_folders

    printed = parse_summary(summary)
    before = before or Disk()
    after = snapshot(output)
    seen = _on_disk(before, after)
    numbers, parts = printed.numbers, printed.parts
    captions = "captions" in numbers
    windows = parts.get("windows", {})
    written_windows = windows.get("captioned", 0) + windows.get("failed", 0) + windows.get("written", 0)
    assert numbers["windows"] == written_windows + windows.get("not reached", 0), summary
    redone = parts.get("clips redone", {})
    assert numbers.get("clips redone", 0) == sum(redone.values()), summary
    assert numbers["failures"] == sum(parts.get("failures", {}).values()), summary
    assert numbers["clips skipped"] <= seen.unchanged, (numbers["clips skipped"], seen.unchanged, summary)
    assert numbers["clips skipped"] + seen.written <= numbers["clips found"], (seen, summary)
    if printed.folders is not None:
        assert sorted(printed.folders) == sorted(output_folders(output)), summary
    if not getattr(_SKIP_TABLE, "on", False):
        _check_table(output, after)
    if printed.ended == "stopped":  # clips in flight as the summary was printed: what is on disk adds up
        return
    expected = {
        "clips found": numbers["clips skipped"] + seen.written,
        "clips failed": seen.failed,
        "clips redone": seen.redone,
        "previews": seen.previews,
        "failures": sum(seen.failures.values()),
    }
    if captions:
        expected.update({"captions": seen.captioned, "prompt tokens": seen.prompt_tokens})
    if "delta clips committed" in numbers or seen.staged:
        expected["delta clips committed"] = seen.staged
    got = {name: numbers.get(name, 0) for name in expected}
    got_parts = {"windows": written_windows, "not reached": windows.get("not reached", 0),
                 "failed before": redone.get("failed before", 0),
                 "failures by stage": dict(parts.get("failures", {})), "flagged": dict(parts.get("flagged captions", {}))}
    want_parts = {"windows": seen.windows, "not reached": 0, "failed before": seen.retried,
                  "failures by stage": dict(seen.failures), "flagged": dict(seen.flags) if captions else
                  got_parts["flagged"]}
    if captions:
        got_parts["captioned"] = windows.get("captioned", 0)
        want_parts["captioned"] = seen.captioned
    mismatches = {name: (got[name], expected[name]) for name in expected if got[name] != expected[name]}
    mismatches.update({name: (got_parts[name], want_parts[name]) for name in want_parts
                       if got_parts[name] != want_parts[name]})
    if printed.ended == "broke":  # the pipeline stopped at its error: a clip found may have been in flight
        mismatches.pop("clips found", None)  # and its windows, not reached
        mismatches.pop("not reached", None)
    if counts is not None:
        for name, value in (("clips", seen.written), ("clips_failed", seen.failed), ("windows", seen.windows),
                            ("previews", seen.previews)):
            if counts.get(name, 0) != value:
                mismatches[f"counter {name}"] = (counts.get(name, 0), value)
        for stage, value in seen.failures.items():
            if counts.get(f"failures_{stage}", 0) != value:
                mismatches[f"counter failures_{stage}"] = (counts.get(f"failures_{stage}", 0), value)
    if progress is not None and captions:  # the progress line counts outcomes, not attempts
        for name, value in (("windows_captioned", seen.caption_ok), ("windows_caption_failed", seen.caption_failed)):
            if progress.get(name, 0) != value:
                mismatches[f"progress {name}"] = (progress.get(name, 0), value)
    assert not mismatches, (f"the summary of the run on {output} is not what its output holds (printed or counted, "
                            f"on disk): {mismatches}\n{summary}\n{FileSystems.join(output, 'metas')}")


_collected = threading.local()


def _recording(format_summary):
    @functools.wraps(format_summary)
    def record(counts, *args, **kwargs):
        text = format_summary(counts, *args, **kwargs)
        if getattr(_collected, "runs", None) is not None:
            _collected.runs.append((dict(counts), text))
        return text

    return record


def _output_of(argv: Sequence[str]) -> Optional[str]:
    argv = list(argv)
    for index, arg in enumerate(argv):
        if arg == "--output" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--output="):
            return arg[len("--output="):]
    return None


def _audited(run_job):
    @functools.wraps(run_job)
    def run(argv, *args, **kwargs):
        from beam_captions import progress

        output = _output_of(argv)
        if not output:
            return run_job(argv, *args, **kwargs)
        before = snapshot(output)
        _collected.runs = []
        try:
            try:
                result = run_job(argv, *args, **kwargs)
            finally:
                runs, _collected.runs = _collected.runs, None
        except SystemExit:
            if runs:
                audit(output, runs[-1][1], runs[-1][0], before)
            raise
        if runs:  # the live progress counters are this process's: only a run whose workers are its threads
            in_process = not any(a.startswith("--runner") and "direct" not in a.lower() or "multi_processing" in a
                                 for a in argv)
            audit(output, runs[-1][1], runs[-1][0], before, progress.snapshot() if in_process else None)
        return result

    return run


def run_command(command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, **kwargs)`` of a run on the command line,
    its summary (stdout) audited against its ``--output``."""
    output = _output_of(command)
    before = snapshot(output) if output else None
    done = subprocess.run(list(command), capture_output=True, text=True, **kwargs)
    if output and re.search(r"^beam-captions (finished|stopped|broke) ", done.stdout, re.MULTILINE):
        audit(output, done.stdout, before=before, progress=_last_progress(done.stderr))
    return done


def _last_progress(stderr: str) -> Optional[dict[str, int]]:
    """The caption counts of the last progress line on ``stderr`` (a captions run), as progress counters."""
    found = re.findall(r"windows \d+ prepared, (\d+) captioned, \d+ enhanced(?:, (\d+) caption failed)?", stderr)
    if not found:
        return None
    captioned, failed = found[-1]
    return {"windows_captioned": int(captioned), "windows_caption_failed": int(failed or 0)}


def audit_every_run() -> None:
    """Audit every ``run_job`` (and ``main``, which calls it) of this process against its output."""
    import beam_captions.cli
    import beam_captions.summary

    if getattr(beam_captions.cli.run_job, "audited", False):
        return
    beam_captions.summary.format_summary = _recording(beam_captions.summary.format_summary)
    beam_captions.cli.run_job = _audited(beam_captions.cli.run_job)
    beam_captions.cli.run_job.audited = True
