"""Every command on a user's mistake or a damaged output: README's table (Bad outputs) read and run, cell by
cell. A command says one line on stderr and exits with the table's status (the Python reader raises the
exception named), and makes no folder the user did not ask for.

Each command runs in this process through ``beam_captions.cli.main`` (``capsys`` holds what the terminal would
show), but on a read-only output: that needs an output this process cannot write to, so its four commands run
in one child process, on a read-only bind mount of the output where the tests run as root (root writes
through any mode) and on an output without write permission otherwise.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
from audit import damaged_output
from clips import make_clip

from beam_captions.cli import main, run_job
from beam_captions.io.read_captions import read_captions

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = ("run", "compact", "gallery", "read_captions")
RUN_FLAGS = ["--generate-previews", "--preview-target-height", "16"]


def readme_table() -> list[tuple[str, str, str]]:
    """``(output, command, cell)`` of every cell of README's table of bad outputs."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n| output | `beam-captions --input IN --output OUT` |")
    lines = text[start + 1:].split("\n\n", 1)[0].splitlines()
    cells = []
    for line in lines[2:]:
        output, *row = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(row) == len(COMMANDS), line
        cells += [(output, command, cell) for command, cell in zip(COMMANDS, row)]
    return cells


TABLE = readme_table()


@dataclass
class Outcome:
    """What one command did: its exit status (``None`` for the reader), the lines it told the terminal (not
    the progress lines), and for the reader the exception it raised (its classes' names and its text) or
    the clips and rows of the table it returned."""

    code: Optional[int] = None
    told: list[str] = field(default_factory=list)
    raised: Optional[list[str]] = None
    message: str = ""
    rows: dict[str, int] = field(default_factory=dict)


def told(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[")]


def argv(command: str, out: str, clips: str, delta: bool) -> list[str]:
    if command == "run":
        return ["--input", clips, "--output", out, *RUN_FLAGS, *(["--captions-table", "delta"] if delta else [])]
    return [command, out]


def read(out: str) -> Outcome:
    """``read_captions(out)``: the rows per clip of what it returned, or what it raised."""
    try:
        table = read_captions(out, ["clip_id"])
    except Exception as error:  # noqa: BLE001 - the outcome checked against the table
        return Outcome(raised=[kind.__name__ for kind in type(error).__mro__], message=str(error))
    rows: dict[str, int] = {}
    for clip_id in table.column("clip_id").to_pylist():
        rows[clip_id] = rows.get(clip_id, 0) + 1
    return Outcome(rows=rows)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, str]:
    """Two clips, and the outputs a previews run made of them: plain Parquet files and a Delta table."""
    root = tmp_path_factory.mktemp("made")
    clips = root / "clips"
    clips.mkdir()
    for number in range(2):
        make_clip(str(clips / f"c{number}.mp4"), 20, 10.0, 96, 64)
    made = {"clips": str(clips)}
    for kind, flags in (("plain", []), ("delta", ["--captions-table", "delta"])):
        made[kind] = str(root / kind)
        run_job(["--input", str(clips), "--output", made[kind], *RUN_FLAGS, "--no-gallery", *flags])
    made["rows"] = json.dumps(read(made["plain"]).rows)
    return made


def damage(output: str, made: dict[str, str], place: Path) -> tuple[str, Optional[str], bool]:
    """A copy of an output damaged as the table's row says: the output, the file at fault, whether Delta."""
    delta = "Delta" in output
    out = str(place / "out")
    if output == "missing":
        return str(place / "no-such-out"), None, False
    shutil.copytree(made["delta" if delta else "plain"], out)
    if output == "read-only":
        return out, None, False
    if output == "a damaged captions file":
        (path,) = sorted(glob.glob(os.path.join(out, "captions", "*.parquet")))[:1]
        Path(path).write_bytes(b"not a Parquet file")
    elif output == "a damaged metas":
        (path,) = sorted(glob.glob(os.path.join(out, "metas", "*.json")))[:1]
        Path(path).write_bytes(b"{not json")
    elif output == "a Delta table with a missing data file":
        (path,) = glob.glob(os.path.join(out, "captions", "part-*.parquet"))
        os.remove(path)
    else:
        raise AssertionError(f"no such bad output in the test: {output}")
    return out, path, delta


def in_process(command: str, out: str, clips: str, delta: bool, capsys) -> Outcome:
    capsys.readouterr()
    if command == "read_captions":
        return read(out)
    with damaged_output():  # the audit of a run leaves out the table damaged on purpose
        try:
            code = main(argv(command, out, clips, delta))
        except SystemExit as exited:
            code = exited.code
    return Outcome(code=code, told=told(capsys.readouterr().err))


READ_ONLY = r"""
import contextlib, ctypes, io, json, os, sys
out, clips, root = sys.argv[1], sys.argv[2], sys.argv[3] == "root"
if root:  # in a user and mount namespace of its own (unshare): OUT becomes a read-only bind mount
    libc = ctypes.CDLL(None, use_errno=True)
    MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
    if (libc.mount(out.encode(), out.encode(), None, MS_BIND | MS_REC, None) != 0
            or libc.mount(None, out.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0):
        raise OSError(ctypes.get_errno(), "a read-only bind mount of " + out)
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[4])))
from test_bad_outputs import COMMANDS, argv, read, told
from beam_captions.cli import main
outcomes = {}
for command in COMMANDS:
    if command == "read_captions":
        outcomes[command] = read(out).__dict__
        continue
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv(command, out, clips, False))
        except SystemExit as exited:
            code = exited.code
    outcomes[command] = {"code": code, "told": told(stderr.getvalue())}
print(json.dumps(outcomes), flush=True)
os._exit(0)  # pyarrow's threads may abort the interpreter's own exit ("terminate called"): the outcomes are out
"""


@pytest.fixture(scope="module")
def read_only(made, tmp_path_factory) -> tuple[str, dict[str, Outcome]]:
    """A read-only copy of the plain output, and what the four commands did on it (in one child process)."""
    out, _, _ = damage("read-only", made, tmp_path_factory.mktemp("read-only"))
    root = os.geteuid() == 0
    command = [sys.executable, "-c", READ_ONLY, out, made["clips"], "root" if root else "user", __file__]
    if root:
        command = ["unshare", "--user", "--map-root-user", "--mount", *command]
    else:
        modes = _without_write(out)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=str(README.parent))
    finally:
        if not root:
            for path, mode in reversed(modes):
                os.chmod(path, mode)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, {name: Outcome(**found) for name, found in json.loads(done.stdout.splitlines()[-1]).items()}


def _without_write(top: str) -> list[tuple[str, int]]:
    """Take the write permission off ``top`` and everything in it; returns the modes to put back."""
    modes = []
    for base, dirs, names in os.walk(top):
        for path in [base, *(os.path.join(base, name) for name in names)]:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            modes.append((path, mode))
            os.chmod(path, mode & ~0o222)
    return modes


def _listing(top: Path) -> set[str]:
    return {os.path.relpath(os.path.join(base, name), top) for base, dirs, names in os.walk(top) for name in dirs}


@pytest.mark.parametrize("output, command, cell", TABLE, ids=[f"{o} | {c}" for o, c, _ in TABLE])
def test_each_command_on_a_bad_output_does_what_the_readme_table_says(output, command, cell, made, tmp_path,
                                                                      capsys, request):
    if output == "read-only":  # the four commands ran at once, in a child process
        out, outcomes = request.getfixturevalue("read_only")
        path, found = None, outcomes[command]
    else:
        out, path, delta = damage(output, made, tmp_path)
        folders = _listing(tmp_path)
        found = in_process(command, out, made["clips"], delta, capsys)
    _check(cell, found, out, path, json.loads(made["rows"]))
    if output == "missing":  # nothing is made there but by the run, which was asked to
        assert os.path.isdir(out) == (command == "run"), cell
    elif output != "read-only" and command in ("gallery", "read_captions"):
        assert _listing(tmp_path) == folders, cell  # no folder made


def _check(cell: str, found: Outcome, out: str, path: Optional[str], rows: dict[str, int]) -> None:
    """``found`` is what the table's ``cell`` says (OUT and FILE stand for ``out`` and ``path``)."""

    def named(text: str) -> str:
        return text.replace("FILE", path or "FILE").replace("OUT", out)

    raised = re.fullmatch(r"raises `(\w+)`(?: \([^)]*\))? naming (OUT|FILE)", cell)
    if raised:
        assert found.raised and raised.group(1) in found.raised, (cell, found)
        assert named(raised.group(2)) in found.message, (cell, found.message)
        return
    if cell.startswith("returns the table"):
        assert found.raised is None, (cell, found)
        if cell == "returns the table":
            assert found.rows == rows, (cell, found.rows)
        else:
            assert cell == "returns the table without that clip's rows", cell
            clip_id = os.path.basename(path)[: -len(".json")]
            assert found.rows == {c: n for c, n in rows.items() if c != clip_id}, (cell, found.rows)
        return
    said = re.fullmatch(r"(\d+)(?:,[^`]*)?(?: `([^`]*)`)?(?: \([^)]*\))?", cell)
    assert said, f"a cell the test cannot read: {cell}"
    assert found.code == int(said.group(1)), (cell, found)
    if said.group(2) is None:
        assert found.told == [], (cell, found.told)
    else:
        (line,) = found.told or [""]
        assert line.startswith("beam-captions: " + named(said.group(2))), (cell, found.told)
        assert path is None or path in line, (cell, line)
