"""A static HTML review gallery of a run's output (``OUT/index.html``, ``OUT/index-2.html``, ...).

The gallery reads ``OUT/metas/*.json`` and ``OUT/failures/*.json`` and shows every clip's windows in
order: the animated preview beside the captions, the window's time span and frames, and the clip's
video facts. Every link is relative (``previews/<clip_id>/<start>_<end>.webp``), so the pages work
opened from a local folder and from a bucket with the same layout. Captions are untrusted model
output: every piece of text is HTML-escaped and a Content-Security-Policy forbids scripts outright.
The same inputs always give the same bytes.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence
from urllib.parse import quote

from apache_beam.io.filesystems import FileSystems

from beam_captions.io.files import parallel_map, read_json, write_bytes
from beam_captions.io.paths import captions_dir, failures_dir, is_local, local_path, metas_dir

__all__ = [
    "CAPTION_FIELDS", "build_gallery", "page_name", "preview_href", "load_clips", "load_failures", "render_pages",
    "write_gallery",
]

_LOG = logging.getLogger(__name__)

# (meta key, label) of each caption a window may carry, in display order; flags live under ``<key>_flags``.
CAPTION_FIELDS: tuple[tuple[str, str], ...] = (
    ("caption", "Caption"),
    ("caption_stage2", "Stage 2"),
    ("enhanced_caption", "Enhanced"),
)

_CSP = (
    "default-src 'none'; img-src 'self' file: data: http: https:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

_CSS = """
:root { color-scheme: light; --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg: #f6f8fa; --bad: #cf222e; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1200px; padding: 16px 24px 48px; color: var(--fg); background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 1.5em; margin: 0.4em 0; }
h2 { font-size: 1.15em; margin: 0 0 4px; overflow-wrap: anywhere; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.9em; }
.muted { color: var(--muted); }
.summary { display: flex; flex-wrap: wrap; gap: 8px; margin: 12px 0; padding: 0; list-style: none; }
.summary li { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; }
.summary b { font-size: 1.2em; margin-right: 4px; }
.pager { display: flex; gap: 16px; align-items: center; margin: 12px 0; }
.pager a { text-decoration: none; border: 1px solid var(--line); border-radius: 6px; padding: 2px 10px; }
.pager .off { color: var(--line); }
.clip { border: 1px solid var(--line); border-radius: 8px; margin: 20px 0; overflow: hidden; }
.clip > header { background: var(--bg); border-bottom: 1px solid var(--line); padding: 10px 14px; }
.facts { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 0; color: var(--muted); font-size: 0.9em; }
.facts dt { display: none; }
.facts dd { margin: 0; }
.warnings, .errors { margin: 6px 0 0; padding-left: 20px; font-size: 0.9em; }
.warnings { color: #9a6700; }
.errors, .error { color: var(--bad); }
.window { display: grid; grid-template-columns: 320px 1fr; gap: 16px; padding: 12px 14px;
  border-top: 1px solid var(--line); }
.window:first-of-type { border-top: 0; }
.preview img { display: block; width: 100%; height: auto; border-radius: 4px; background: #000; }
.nopreview { display: flex; align-items: center; justify-content: center; min-height: 120px;
  border: 1px dashed var(--line); border-radius: 4px; color: var(--muted); }
.span { font-size: 0.9em; color: var(--muted); margin-bottom: 6px; }
.span b { color: var(--fg); }
.caption { margin: 6px 0; padding: 6px 10px; border-left: 3px solid var(--line); }
.caption .label { font-size: 0.8em; font-weight: 600; text-transform: uppercase; color: var(--muted); }
.caption p { margin: 2px 0 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.caption.missing p { color: var(--muted); font-style: italic; }
.caption.flagged { border-left-color: var(--bad); background: #fff5f5; }
.flag { display: inline-block; margin-left: 6px; padding: 0 6px; border-radius: 10px; font-size: 0.8em;
  background: var(--bad); color: #fff; }
.models { font-size: 0.8em; color: var(--muted); }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg); }
.scroll { overflow-x: auto; }
td.msg { white-space: pre-wrap; overflow-wrap: anywhere; min-width: 16em; }
@media (max-width: 700px) { .window { grid-template-columns: 1fr; } body { padding: 8px; } }
"""


@dataclass(frozen=True)
class _Page:
    """One gallery page: its file name, 1-based number and the clips it shows."""

    name: str
    number: int
    clips: Sequence[dict[str, Any]]


def _esc(value: Any) -> str:
    """``value`` as escaped HTML text (``None`` becomes an empty string)."""
    return html.escape("" if value is None else str(value), quote=True)


def page_name(number: int) -> str:
    """File name of the 1-based page ``number``: ``index.html``, ``index-2.html``, ..."""
    return "index.html" if number == 1 else f"index-{number}.html"


def _list_json(folder: str) -> list[str]:
    """Sorted paths of the ``*.json`` files directly under ``folder`` (none if it does not exist)."""
    results = FileSystems.match([FileSystems.join(folder, "*.json")])  # a missing folder matches nothing
    return sorted(m.path for result in results for m in result.metadata_list)


def _read_all(paths: Sequence[str]) -> list[tuple[str, Any]]:
    """``(path, parsed JSON or the exception)`` per path, in order; reads run on a few threads."""

    def read(path: str) -> Any:
        try:
            return read_json(path)
        except Exception as exc:  # one unreadable file must not hide the rest of the run: listed under Failures
            _LOG.info("gallery: cannot read %s: %s", path, exc)
            return exc

    return list(zip(paths, parallel_map(read, paths)))


def _unreadable(path: str, exc: BaseException) -> dict[str, Any]:
    """A failure record describing a JSON file the gallery could not read."""
    return {"source": path, "clip_id": None, "stage": "gallery", "error_type": type(exc).__name__,
            "message": str(exc), "window_index": None}


def _clip_key(meta: dict[str, Any]) -> tuple[str, str]:
    return (str(meta.get("source") or ""), str(meta.get("clip_id") or ""))


def _windows(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The clip's windows sorted by window index."""
    windows = [w for w in meta.get("windows") or [] if isinstance(w, dict)]
    return sorted(windows, key=lambda w: (int(w.get("window_index") or 0), int(w.get("start_frame") or 0)))


def load_clips(output: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All clip metas sorted by source (windows sorted by index), and failures for unreadable metas."""
    clips, problems = [], []
    for path, document in _read_all(_list_json(metas_dir(output))):
        if isinstance(document, dict) and document.get("clip_id"):
            clips.append({**document, "windows": _windows(document)})
        else:
            problems.append(_unreadable(path, document if isinstance(document, Exception) else ValueError(
                "not a clip meta document")))
    return sorted(clips, key=_clip_key), problems


def _failure_key(failure: dict[str, Any]) -> tuple:
    window = failure.get("window_index")
    return (str(failure.get("source") or ""), window is not None, window if isinstance(window, int) else 0,
            str(failure.get("stage") or ""), json.dumps(failure, sort_keys=True, default=str))


def load_failures(output: str) -> list[dict[str, Any]]:
    """All failure records under ``OUT/failures/`` sorted by source, window and stage."""
    failures = []
    for path, document in _read_all(_list_json(failures_dir(output))):
        if isinstance(document, dict):
            failures.append(document)
        else:
            failures.append(_unreadable(path, document if isinstance(document, Exception) else ValueError(
                "not a failure record")))
    return sorted(failures, key=_failure_key)


def _timestamp(seconds: Any) -> str:
    """``seconds`` as ``m:ss.s`` (``h:mm:ss.s`` past an hour); ``?`` when unknown."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "?"
    tenths = int(round(max(seconds, 0.0) * 10))
    hours, rest = divmod(tenths, 36000)
    minutes, rest = divmod(rest, 600)
    text = f"{minutes:02d}:{rest // 10:02d}.{rest % 10}" if hours else f"{minutes}:{rest // 10:02d}.{rest % 10}"
    return f"{hours}:{text}" if hours else text


def _number(value: Any) -> str:
    """A compact rendering of a number (``25``, ``29.97``); ``?`` when unknown."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "?"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def preview_href(clip_id: str, window: dict[str, Any]) -> str:
    """The relative link of a window's preview, built from ids (never the absolute URI in the meta)."""
    return f"previews/{quote(str(clip_id), safe='')}/{int(window['start_frame'])}_{int(window['end_frame'])}.webp"


def _flags(window: dict[str, Any], key: str) -> list[str]:
    """The sanity flags raised on caption ``key`` of ``window`` (empty when none)."""
    flags = window.get(f"{key}_flags")
    if isinstance(flags, str):
        return [flags]
    return [str(flag) for flag in flags] if isinstance(flags, (list, tuple)) else []


def _caption_html(window: dict[str, Any], key: str, label: str) -> str:
    """One caption block; stage-1 is always shown, later stages only when present."""
    text, flags = window.get(key), _flags(window, key)
    if text is None and key != "caption" and not flags:
        return ""
    classes = "caption" + (" flagged" if flags else "") + (" missing" if text is None else "")
    badges = "".join(f'<span class="flag">{_esc(flag)}</span>' for flag in flags)
    flagged = f'<span class="muted"> flagged:</span>{badges}' if flags else ""
    body = "(no caption)" if text is None else _esc(text)
    return (f'<div class="{classes}" data-field="{_esc(key)}"><span class="label">{_esc(label)}</span>{flagged}'
            f"<p>{body}</p></div>")


def _models_html(window: dict[str, Any]) -> str:
    parts = [f"{label} {_esc(window.get(key))}" for key, label in
             (("caption_model", "model"), ("prompt_variant", "prompt"), ("enhance_model", "enhancer"))
             if window.get(key)]
    return f'<div class="models">{" · ".join(parts)}</div>' if parts else ""


def _window_errors_html(errors: Iterable[dict[str, Any]]) -> str:
    items = "".join(f"<li>{_esc(e.get('stage'))}: {_esc(e.get('error_type'))}: {_esc(e.get('message'))}</li>"
                    for e in errors)
    return f'<ul class="errors">{items}</ul>' if items else ""


def _window_html(clip_id: str, window: dict[str, Any], errors: list[dict[str, Any]]) -> str:
    """One window: preview on the left; span, captions and errors on the right."""
    if window.get("preview") and window.get("start_frame") is not None and window.get("end_frame") is not None:
        preview = (f'<img src="{_esc(preview_href(clip_id, window))}" loading="lazy" decoding="async" '
                   f'alt="preview of window {_esc(window.get("window_index"))}">')
    else:
        preview = '<div class="nopreview">no preview</div>'
    sampled = window.get("sampled_frames") or []
    span = (f'<div class="span"><b>#{_esc(window.get("window_index"))}</b> '
            f'{_timestamp(window.get("start_s"))}–{_timestamp(window.get("end_s"))} · '
            f'frames {_esc(window.get("start_frame"))}–{_esc(window.get("end_frame"))} · '
            f'<span title="{_esc(", ".join(str(f) for f in sampled))}">{len(sampled)} sampled</span></div>')
    captions = "".join(_caption_html(window, key, label) for key, label in CAPTION_FIELDS)
    return (f'<div class="window" id="{_esc(clip_id)}-{_esc(window.get("window_index"))}">'
            f'<div class="preview">{preview}</div>'
            f"<div>{span}{captions}{_models_html(window)}{_window_errors_html(errors)}</div></div>")


def _facts_html(meta: dict[str, Any]) -> str:
    """The clip's video facts, or a note that it could not be decoded."""
    if meta.get("width") is None:
        return '<dl class="facts"><dt>status</dt><dd class="error">not decoded</dd></dl>'
    facts = [
        ("size", f"{_number(meta.get('width'))}×{_number(meta.get('height'))}"),
        ("fps", f"{_number(meta.get('fps'))} fps"),
        ("duration", _timestamp(meta.get("duration_s"))),
        ("frames", f"{_number(meta.get('num_frames'))} frames"),
        ("codec", _esc(meta.get("codec"))),
        ("windows", f"{len(meta['windows'])} window{'' if len(meta['windows']) == 1 else 's'}"),
    ]
    return '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"


def _clip_html(meta: dict[str, Any]) -> str:
    """One clip card: header with source and facts, then its windows in order."""
    clip_id = str(meta["clip_id"])
    errors = [e for e in meta.get("errors") or [] if isinstance(e, dict)]
    warnings = "".join(f"<li>{_esc(w)}</li>" for w in meta.get("warnings") or [])
    header = (f'<header><h2 class="mono">{_esc(meta.get("source"))}</h2>'
              f'<div class="muted mono">{_esc(clip_id)} · <a href="metas/{_esc(quote(clip_id, safe=""))}.json">'
              f"meta</a></div>{_facts_html(meta)}"
              + (f'<ul class="warnings">{warnings}</ul>' if warnings else "")
              + _window_errors_html(e for e in errors if e.get("window_index") is None) + "</header>")
    windows = "".join(
        _window_html(clip_id, w, [e for e in errors if e.get("window_index") == w.get("window_index")
                                  and e.get("window_index") is not None])
        for w in meta["windows"])
    return f'<section class="clip" id="clip-{_esc(clip_id)}">{header}{windows}</section>'


def _summary(clips: Sequence[dict[str, Any]], failures: Sequence[dict[str, Any]],
             table_rows: Optional[int] = None) -> dict[str, int]:
    """Counts over the whole run, for the first page (``table_rows``: the captions table's rows as
    ``read_captions`` reads them, one per window when the table and the metas agree)."""
    windows = [w for c in clips for w in c["windows"]]
    return {
        "clips": len(clips),
        "windows": len(windows),
        "captions": sum(w.get("caption") is not None for w in windows),
        "stage-2 captions": sum(w.get("caption_stage2") is not None for w in windows),
        "enhanced captions": sum(w.get("enhanced_caption") is not None for w in windows),
        "previews": sum(bool(w.get("preview")) for w in windows),
        "flagged captions": sum(bool(_flags(w, key)) for w in windows for key, _ in CAPTION_FIELDS),
        "failures": len(failures),
        **({"rows in the captions table": table_rows} if table_rows is not None else {}),
    }


def _summary_html(counts: dict[str, int]) -> str:
    items = "".join(f'<li data-count="{_esc(k)}"><b>{v}</b>{_esc(k)}</li>' for k, v in counts.items())
    return f'<ul class="summary">{items}</ul>'


def _failures_html(failures: Sequence[dict[str, Any]], clip_pages: dict[str, str]) -> str:
    """The failures table; a failure's source links to its clip's card when the clip has one."""
    if not failures:
        return '<section id="failures"><h2>Failures</h2><p class="muted">No failures.</p></section>'
    rows = []
    for f in failures:
        source, clip_id = _esc(f.get("source")), str(f.get("clip_id") or "")
        if clip_id in clip_pages:
            source = f'<a href="{_esc(clip_pages[clip_id])}#clip-{_esc(clip_id)}">{source}</a>'
        window = "" if f.get("window_index") is None else _esc(f.get("window_index"))
        rows.append(f'<tr><td class="mono">{source}</td><td>{window}</td><td>{_esc(f.get("stage"))}</td>'
                    f'<td>{_esc(f.get("error_type"))}</td><td class="msg">{_esc(f.get("message"))}</td></tr>')
    return (f'<section id="failures"><h2>Failures ({len(failures)})</h2><div class="scroll"><table><thead><tr>'
            f"<th>Source</th><th>Window</th><th>Stage</th><th>Error type</th><th>Message</th></tr></thead>"
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')


def _pager_html(number: int, total: int) -> str:
    """Previous / next links and the page position (nothing when there is a single page)."""
    if total == 1:
        return ""

    def link(target: int, text: str, rel: str) -> str:
        if 1 <= target <= total and target != number:
            return f'<a href="{page_name(target)}" rel="{rel}">{text}</a>'
        return f'<span class="off">{text}</span>'

    return (f'<nav class="pager">{link(1, "« First", "first")}{link(number - 1, "‹ Previous", "prev")}'
            f"<span>Page {number} of {total}</span>{link(number + 1, 'Next ›', 'next')}"
            f'{link(total, "Last »", "last")}</nav>')


def _document(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="referrer" content="no-referrer">'
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _paginate(clips: Sequence[dict[str, Any]], clips_per_page: int) -> list[_Page]:
    """Split the clips into pages (always at least one, possibly empty)."""
    total = max(1, math.ceil(len(clips) / clips_per_page))
    return [_Page(page_name(n), n, clips[(n - 1) * clips_per_page: n * clips_per_page]) for n in range(1, total + 1)]


def render_pages(clips: Sequence[dict[str, Any]], failures: Sequence[dict[str, Any]],
                 clips_per_page: int = 50, table_rows: Optional[int] = None) -> dict[str, str]:
    """Every gallery page's HTML by file name; the first page also holds the summary and the failures."""
    if clips_per_page < 1:
        raise ValueError(f"clips_per_page must be >= 1, got {clips_per_page}")
    pages = _paginate(clips, clips_per_page)
    clip_pages = {str(c["clip_id"]): p.name for p in pages for c in p.clips}
    rendered = {}
    for page in pages:
        pager = _pager_html(page.number, len(pages))
        extra = (_summary_html(_summary(clips, failures, table_rows)) if page.number == 1 else "")
        cards = "".join(_clip_html(c) for c in page.clips) or '<p class="muted">No clips.</p>'
        tail = _failures_html(failures, clip_pages) if page.number == 1 else ""
        body = (f"<h1>beam-captions gallery</h1>{extra}{pager}\n<main>\n{cards}\n</main>\n{pager}{tail}")
        rendered[page.name] = _document(f"beam-captions gallery · page {page.number} of {len(pages)}", body)
    return rendered


def _remove_stale_pages(output: str, keep: Iterable[str]) -> None:
    """Delete ``index-N.html`` pages left over from an earlier, larger run."""
    results = FileSystems.match([FileSystems.join(output, "index-*.html")])
    kept = set(keep)
    stale = sorted(m.path for r in results for m in r.metadata_list if m.path.rsplit("/", 1)[-1] not in kept)
    if stale:
        FileSystems.delete(stale)


def _table_rows(output: str) -> tuple[Optional[int], list[dict[str, Any]]]:
    """Rows of the captions table through ``read_captions`` (each window once; none before any clip), or
    ``None`` and a failure record for what could not be read (a damaged captions file, a data file of a
    Delta table gone), which the gallery lists under Failures instead of stopping."""
    from beam_captions.io.files import UnreadableFile
    from beam_captions.io.read_captions import has_output, read_captions

    try:
        return (read_captions(output, ["clip_id", "window_index"]).num_rows if has_output(output) else 0), []
    except (UnreadableFile, OSError) as exc:
        _LOG.info("gallery: cannot read the captions table of %s", output, exc_info=True)
        if isinstance(exc, UnreadableFile):
            return None, [{**_unreadable(exc.path, exc), "message": exc.reason}]
        if exc.filename and exc.strerror:  # a data file of a Delta table gone
            return None, [{**_unreadable(str(exc.filename), exc), "message": exc.strerror}]
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), repr(exc))
        return None, [{**_unreadable(captions_dir(output), exc), "message": first}]


def is_run_output(output: str) -> bool:
    """Whether ``output`` is the output root of a run: a ``metas/`` or ``failures/`` folder under it (local),
    or at least one object under ``OUT/metas/`` or ``OUT/failures/`` (an object store has no empty folders).
    A listing error is raised, never taken for "not an output"."""
    if is_local(output):
        root = local_path(output)
        return any(os.path.isdir(os.path.join(root, name)) for name in ("metas", "failures"))
    return any(result.metadata_list
               for folder in (metas_dir(output), failures_dir(output))
               for result in FileSystems.match([FileSystems.join(folder, "*")], limits=[1]))


def write_gallery(output: str, clips_per_page: int = 50) -> str:
    """Write the gallery pages under ``output`` and return the URI of ``OUT/index.html``."""
    return build_gallery(output, clips_per_page)[0]


def build_gallery(output: str, clips_per_page: int = 50) -> tuple[str, list[dict[str, Any]]]:
    """``write_gallery``, and the failure records (stage ``gallery``) of what it could not read and lists
    under Failures: metas, failure records, the captions table."""
    clips, problems = load_clips(output)
    rows, unread_table = _table_rows(output)
    failures = sorted(load_failures(output) + problems + unread_table, key=_failure_key)
    pages = render_pages(clips, failures, clips_per_page, rows)
    for name, text in pages.items():
        write_bytes(FileSystems.join(output, name), text.encode("utf-8"), "text/html; charset=utf-8")
    _remove_stale_pages(output, pages)
    return FileSystems.join(output, page_name(1)), [f for f in failures if f.get("stage") == "gallery"]
