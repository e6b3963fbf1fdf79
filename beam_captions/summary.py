"""The short table printed at the end of a run."""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["first_line", "format_summary", "output_folders", "plural"]

OUTPUT_FOLDERS = ("captions", "previews", "metas", "failures")


def output_folders(output: str) -> list[str]:
    """Which of ``OUTPUT_FOLDERS`` exist under ``output`` (on ``gs://``: hold an object; one listing each)."""
    import os

    from apache_beam.io.filesystems import FileSystems

    from beam_captions.io.paths import is_local, local_path

    if is_local(output):
        return [name for name in OUTPUT_FOLDERS if os.path.isdir(os.path.join(local_path(output), name))]
    found = []
    for name in OUTPUT_FOLDERS:
        try:
            if FileSystems.match([FileSystems.join(output, name, "**")], limits=[1])[0].metadata_list:
                found.append(name)
        except Exception:  # noqa: BLE001 - cannot list: the folder is not named
            pass
    return found


def plural(n: int, one: str, many: Optional[str] = None) -> str:
    """``1 clip``, ``2 clips``, ``0 clips`` (``many``: an irregular plural)."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def first_line(command: str, seconds: float, stopped: bool = False, error: Optional[str] = None) -> str:
    """How the command ended: ``finished in N s``, ``stopped after N s`` (a signal) or ``broke after N s:
    <the error>`` (exit status 1)."""
    if error is not None:
        return f"{command} broke after {seconds:.1f} s: {error}"
    return f"{command} {'stopped after' if stopped else 'finished in'} {seconds:.1f} s"


def format_summary(counts: dict[str, int], output: str, seconds: float, captions: bool = True,
                   folders: Optional[Sequence[str]] = None, stopped: bool = False,
                   error: Optional[str] = None) -> str:
    """Clips, windows, captions, previews and failures by stage, with the caption rate and output root.

    The first line says how the run ended (``first_line``): finished, ``stopped`` by a signal, or broke
    with ``error`` (it then exits 1).

    ``captions=False`` (a previews-only run) leaves out the caption lines. Warnings that repeat per clip
    are told once per kind (``warnings_<kind>`` counters). The output line names the ``folders`` the output
    has (default: those that exist now, ``output_folders``). Windows add up: those prepared are written
    (captioned or not) or not reached (a stop, a clip cut short).
    """
    from beam_captions.logs import WARNING_KINDS

    failures = {name[len("failures_"):]: n for name, n in sorted(counts.items()) if name.startswith("failures_")}
    by_stage = ", ".join(f"{stage} {n}" for stage, n in failures.items())
    flagged = ", ".join(f"{name[len('flagged_'):]} {n}" for name, n in sorted(counts.items()) if name.startswith("flagged_"))
    with_captions = captions
    captions = counts.get("captions", 0)
    prompt_tokens = counts.get("caption_prompt_tokens", 0)
    redone = sum(counts.get(name, 0) for name in ("clips_retried", "clips_replaced", "clips_other_settings",
                                                  "clips_extended", "clips_not_skipped"))
    lines = [
        first_line("beam-captions", seconds, stopped, error),
        f"  clips found      {counts.get('clips_found', 0)}",
        f"  files ignored    {counts.get('files_ignored_not_video', 0)} (not video by name)",
        f"  clips skipped    {counts.get('clips_skipped', 0)} (finished by an earlier run)",
        *([f"  clips redone     {redone} (failed before {counts.get('clips_retried', 0)}, source replaced "
           f"{counts.get('clips_replaced', 0)}, made with other settings {counts.get('clips_other_settings', 0)}, "
           f"outputs missing {counts.get('clips_extended', 0)}, --no-skip-existing "
           f"{counts.get('clips_not_skipped', 0)})"] if redone else []),
        *([f"  duplicates       {plural(counts['duplicates_dropped'], 'late element')} of written clips dropped"]
          if counts.get("duplicates_dropped") else []),
        f"  clips failed     {counts.get('clips_failed', 0)}",
        f"  windows          {_windows_line(counts, with_captions)}",
    ]
    if with_captions:
        lines += [
            f"  captions         {captions} ({captions / seconds if seconds > 0 else 0:.2f}/s)",
            f"  prompt tokens    {prompt_tokens} ({prompt_tokens // captions if captions else 0} per window)",
            f"  flagged captions {flagged or 'none'}",
        ]
    warned = [(n, WARNING_KINDS.get(name[len("warnings_"):], name[len("warnings_"):].replace("_", " ")))
              for name, n in sorted(counts.items()) if name.startswith("warnings_") and n]
    lines += [
        f"  previews         {counts.get('previews', 0)}",
        f"  failures         {sum(failures.values())}" + (f" ({by_stage})" if by_stage else ""),
        *([f"  delta table      {plural(counts.get('delta_clips_committed', 0), 'clip')} committed in "
           f"{plural(counts['delta_commits'], 'commit')} "
           f"({counts.get('delta_commit_retries', 0)} retried after a conflict)"]
          if counts.get("delta_commits") else []),
        *([f"  delta staged     {plural(counts['delta_clips_staged'], 'clip')} staged and not committed: the next "
           f"run commits them (or `beam-captions compact`)"] if counts.get("delta_clips_staged") else []),
        f"  outputs          {output}" + _folders(output, folders),
    ]
    if warned:
        told = [f"{n} {what.replace('clips ', 'clip ', 1) if n == 1 else what}" for n, what in warned]
        lines.insert(-1, "  warnings         " + ", ".join(told))
    return "\n".join(lines)


def _windows_line(counts: dict[str, int], captions: bool) -> str:
    """Windows prepared = captioned + not captioned (failed) + not reached; or written + not reached."""
    written = counts.get("windows", 0)
    prepared = max(counts.get("windows_prepared", 0), written)
    parts = ([f"{counts.get('captions', 0)} captioned", f"{written - counts.get('captions', 0)} failed"]
             if captions else [f"{written} written"])
    if prepared > written:
        parts.append(f"{prepared - written} not reached")
    return f"{prepared} ({', '.join(parts)})"


def _folders(output: str, folders: Optional[Sequence[str]]) -> str:
    names = output_folders(output) if folders is None else folders
    return f"  ({' '.join(f'{name}/' for name in names)})" if names else "  (nothing written)"
