"""The review gallery: HTML escaping, relative links, pagination, failures, flags, and a real Chromium render."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from clips import textured_frames

from beam_captions.io.gallery import _timestamp, page_name, write_gallery
from beam_captions.media.webp import encode_webp

HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_IMG = '"><img src=x onerror="window.__pwned=1">'
CHROMIUM = os.environ.get("BEAM_CAPTIONS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-quic",
]


def window(index: int, start: int, end: int, fps: float = 25.0, **fields: Any) -> dict[str, Any]:
    """A window meta as the pipeline writes it (preview URIs are absolute, as in real output)."""
    base = {
        "window_index": index, "start_frame": start, "end_frame": end, "start_s": start / fps,
        "end_s": (end + 1) / fps, "sampled_frames": [start, (start + end) // 2, end], "caption": f"caption {index}",
        "caption_stage2": None, "enhanced_caption": None, "caption_model": "captioner", "enhance_model": None,
        "prompt_variant": "default", "preview": None,
    }
    return {**base, **fields}


def clip(clip_id: str, source: str, windows: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    base = {
        "version": 1, "clip_id": clip_id, "source": source, "width": 64, "height": 48, "fps": 25.0,
        "num_frames": 250, "codec": "h264", "duration_s": 10.0, "warnings": [], "windows": windows, "errors": [],
    }
    return {**base, **fields}


def failure(source: str, clip_id: Optional[str], stage: str, error_type: str, message: str,
            window_index: Optional[int] = None) -> dict[str, Any]:
    return {"source": source, "clip_id": clip_id, "stage": stage, "error_type": error_type, "message": message,
            "window_index": window_index}


def write_output(root: Path, metas: list[dict[str, Any]], failures: list[dict[str, Any]] = (),
                 previews: bool = True) -> str:
    """Lay ``metas`` and ``failures`` out under ``root``; real animated WebPs for windows that name a preview."""
    (root / "metas").mkdir(parents=True, exist_ok=True)
    (root / "failures").mkdir(exist_ok=True)
    for seed, meta in enumerate(metas):
        for w in meta["windows"]:
            if w.get("preview") and previews:
                path = root / "previews" / meta["clip_id"] / f"{w['start_frame']}_{w['end_frame']}.webp"
                path.parent.mkdir(parents=True, exist_ok=True)
                frames = textured_frames(3, 90, 160, seed=seed)
                path.write_bytes(encode_webp(frames, fps=1.0, threads=1))
        (root / "metas" / f"{meta['clip_id']}.json").write_text(json.dumps(meta))
    for k, record in enumerate(failures):
        (root / "failures" / f"failure-{k}.json").write_text(json.dumps(record))
    return str(root)


def with_previews(root: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with every window's preview set to the absolute URI the pipeline would write."""
    for w in meta["windows"]:
        w["preview"] = str(root / "previews" / meta["clip_id"] / f"{w['start_frame']}_{w['end_frame']}.webp")
    return meta


def review_dataset(root: Path) -> tuple[str, int]:
    """A small run: a hostile clip, a clip with three stages and flags, a failed clip; returns (root, previews)."""
    hostile = with_previews(root, clip("aaaaaaaa-0000-0000-0000-000000000001", f"gs://bucket/{HOSTILE_IMG}.mp4", [
        window(0, 0, 124, caption=f"A cat {HOSTILE_SCRIPT} sits", caption_flags=["refusal"]),
        window(1, 125, 249, caption=HOSTILE_IMG),
    ], warnings=[f"odd container {HOSTILE_SCRIPT}"]))
    staged = with_previews(root, clip("bbbbbbbb-0000-0000-0000-000000000002", "gs://bucket/bikes.mp4", [
        window(1, 125, 249, caption="is " * 40, caption_stage2="Two bikes on a road.",
               enhanced_caption="Two cyclists ride along a sunlit country road.",
               caption_flags=["repetition", "truncated"], enhance_model="enhancer"),
        window(0, 0, 124, caption=None, caption_flags=["empty"]),
    ]))
    broken = clip("cccccccc-0000-0000-0000-000000000003", "gs://bucket/not-a-video.mp4", [], width=None,
                  height=None, fps=None, num_frames=None, codec=None, duration_s=None, errors=[
                      failure("gs://bucket/not-a-video.mp4", "cccccccc-0000-0000-0000-000000000003", "prepare",
                              "DecodeError", "not a readable media file")])
    failures = [
        failure("gs://bucket/not-a-video.mp4", broken["clip_id"], "prepare", "DecodeError",
                "not a readable media file"),
        failure("gs://bucket/bikes.mp4", staged["clip_id"], "caption", "EngineError", f"boom {HOSTILE_SCRIPT}", 0),
    ]
    return write_output(root, [hostile, staged, broken], failures), 4


def read_page(output: str, number: int = 1) -> str:
    return (Path(output) / page_name(number)).read_text(encoding="utf-8")


# ---------------------------------------------------------------- unit tests


def test_hostile_text_is_escaped(tmp_path: Path) -> None:
    output, _ = review_dataset(tmp_path)
    assert write_gallery(output) == str(tmp_path / "index.html")
    page = read_page(output)
    assert "<script" not in page.lower()
    assert HOSTILE_SCRIPT not in page and "<img src=x" not in page and 'onerror="' not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 3  # caption, warning, failure message
    assert "&quot;&gt;&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;" in page  # caption and source
    assert "Content-Security-Policy" in page


def test_preview_links_are_relative_and_built_from_ids(tmp_path: Path) -> None:
    output, previews = review_dataset(tmp_path)
    write_gallery(output)
    page = read_page(output)
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources == [
        "previews/aaaaaaaa-0000-0000-0000-000000000001/0_124.webp",
        "previews/aaaaaaaa-0000-0000-0000-000000000001/125_249.webp",
        "previews/bbbbbbbb-0000-0000-0000-000000000002/0_124.webp",
        "previews/bbbbbbbb-0000-0000-0000-000000000002/125_249.webp",
    ]
    assert len(sources) == previews
    assert str(tmp_path) not in page  # never the absolute URIs from the metas
    for link in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert not link.startswith("/") and ":" not in link.split("#")[0], link
    assert page.count('loading="lazy"') == previews


def test_windows_in_order_with_time_span_and_clip_facts(tmp_path: Path) -> None:
    output, _ = review_dataset(tmp_path)
    write_gallery(output)
    page = read_page(output)
    staged = page[page.index('id="clip-bbbbbbbb'):]
    assert staged.index("#0</b>") < staged.index("#1</b>")  # the meta lists window 1 first
    assert "0:00.0–0:05.0 · frames 0–124" in page and "0:05.0–0:10.0 · frames 125–249" in page
    assert "64×48" in page and "25 fps" in page and "0:10.0" in page and "h264" in page
    assert "odd container &lt;script&gt;" in page
    assert "not decoded" in page
    # clips sorted by source: the hostile gs://bucket/"... sorts before gs://bucket/b...
    assert page.index('id="clip-aaaaaaaa') < page.index('id="clip-bbbbbbbb') < page.index('id="clip-cccccccc')
    assert "Two bikes on a road." in page and "Two cyclists ride along a sunlit country road." in page
    assert "Stage 2" in page and "Enhanced" in page and "enhancer" in page
    assert "(no caption)" in page


def test_flags_are_shown(tmp_path: Path) -> None:
    output, _ = review_dataset(tmp_path)
    write_gallery(output)
    page = read_page(output)
    assert page.count('class="caption flagged"') == 2 and page.count('class="caption flagged missing"') == 1
    for flag in ("refusal", "repetition", "truncated", "empty"):
        assert f'<span class="flag">{flag}</span>' in page
    assert '<li data-count="flagged captions"><b>3</b>' in page


def test_summary_and_failures(tmp_path: Path) -> None:
    output, _ = review_dataset(tmp_path)
    write_gallery(output)
    page = read_page(output)
    counts = dict(re.findall(r'<li data-count="([^"]+)"><b>(\d+)</b>', page))
    assert counts == {"clips": "3", "windows": "4", "captions": "3", "stage-2 captions": "1",
                      "enhanced captions": "1", "previews": "4", "flagged captions": "3", "failures": "2",
                      "rows in the captions table": "0"}  # metas only: no Parquet table was written here
    table = page[page.index('<section id="failures">'):]
    assert "Failures (2)" in table
    rows = re.findall(r"<tr><td.*?</tr>", table)
    assert len(rows) == 2
    assert "prepare" in rows[1] and "DecodeError" in rows[1] and "not a readable media file" in rows[1]
    assert "caption" in rows[0] and "EngineError" in rows[0] and "boom &lt;script&gt;" in rows[0]
    assert 'href="index.html#clip-cccccccc-0000-0000-0000-000000000003"' in rows[1]


def test_pagination_and_navigation(tmp_path: Path) -> None:
    metas = [clip(f"{k:08d}-0000-0000-0000-000000000000", f"gs://bucket/clip-{k}.mp4", [window(0, 0, 10)])
             for k in (4, 2, 0, 3, 1)]
    output = write_output(tmp_path, metas, [failure("gs://bucket/clip-3.mp4", metas[3]["clip_id"], "caption",
                                                    "EngineError", "boom", 0)])
    write_gallery(output, clips_per_page=2)
    assert sorted(p.name for p in tmp_path.glob("index*.html")) == ["index-2.html", "index-3.html", "index.html"]
    pages = [read_page(output, n) for n in (1, 2, 3)]
    shown = [re.findall(r"gs://bucket/clip-(\d)\.mp4</h2>", p) for p in pages]
    assert shown == [["0", "1"], ["2", "3"], ["4"]]

    def nav(page: str) -> dict[str, str]:
        return {rel: href for href, rel in re.findall(r'<a href="([^"]+)" rel="(\w+)">', page)}

    assert nav(pages[0]) == {"next": "index-2.html", "last": "index-3.html"}
    assert nav(pages[1]) == {"first": "index.html", "prev": "index.html", "next": "index-3.html",
                             "last": "index-3.html"}
    assert nav(pages[2]) == {"first": "index.html", "prev": "index-2.html"}
    assert "Page 2 of 3" in pages[1]
    assert 'class="summary"' in pages[0] and all('class="summary"' not in p for p in pages[1:])
    assert 'href="index-2.html#clip-00000003' in pages[0]  # a failure links to the page holding its clip
    assert all('id="failures"' not in p for p in pages[1:])

    write_gallery(output, clips_per_page=5)  # fewer pages now: the stale ones go
    assert [p.name for p in tmp_path.glob("index*.html")] == ["index.html"]
    with pytest.raises(ValueError):
        write_gallery(output, clips_per_page=0)


def test_deterministic_bytes_independent_of_root(tmp_path: Path) -> None:
    first, _ = review_dataset(tmp_path / "a")
    second, _ = review_dataset(tmp_path / "b")
    write_gallery(first)
    once = (Path(first) / "index.html").read_bytes()
    write_gallery(first)
    write_gallery(second)
    assert (Path(first) / "index.html").read_bytes() == once == (Path(second) / "index.html").read_bytes()


def test_empty_or_missing_output_and_unreadable_meta(tmp_path: Path) -> None:
    write_gallery(str(tmp_path / "nothing"))
    page = read_page(str(tmp_path / "nothing"))
    assert "No clips." in page and "No failures." in page
    output = write_output(tmp_path / "bad", [clip("dddddddd-0000-0000-0000-000000000004", "gs://b/x.mp4", [])])
    (Path(output) / "metas" / "broken.json").write_text("{not json")
    write_gallery(output)
    page = read_page(output)
    assert "gs://b/x.mp4" in page and "broken.json" in page and "gallery" in page


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0:00.0"), (10.24, "0:10.2"), (59.96, "1:00.0"), (3725.5, "1:02:05.5"), (None, "?"), (float("nan"), "?"),
])
def test_timestamp(seconds: Any, text: str) -> None:
    assert _timestamp(seconds) == text


# ---------------------------------------------------------------- real browser


def launch_chromium(playwright: Any) -> Any:
    """Headless Chromium from the system package (never a downloaded browser); fails clearly when missing."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium is needed for the gallery browser test but {CHROMIUM} does not exist: "
                    "install it with `apt-get install -y chromium` (or set BEAM_CAPTIONS_CHROMIUM)")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=20_000)


def test_gallery_renders_in_chromium(tmp_path: Path) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the gallery browser test needs the `playwright` package: pip install -e '.[test]'")
    output, previews = review_dataset(tmp_path / "out")
    url = Path(write_gallery(output)).as_uri()
    started = time.monotonic()
    dialogs: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(url, wait_until="load")
            page.evaluate("() => { for (const img of document.images) img.scrollIntoView(); window.scrollTo(0, 0); }")
            page.wait_for_function(
                "() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)", timeout=10_000)
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == previews and all(w == 160 for w in widths), widths
            captions = page.eval_on_selector_all(".caption p", "ps => ps.map(p => p.textContent)")
            assert f"A cat {HOSTILE_SCRIPT} sits" in captions and HOSTILE_IMG in captions
            assert page.eval_on_selector_all("script", "s => s.length") == 0
            assert page.eval_on_selector_all(".caption img, .caption script", "e => e.length") == 0
            assert page.evaluate("() => window.__pwned") is None and dialogs == []
            assert HOSTILE_IMG + ".mp4" in page.inner_text("#clip-aaaaaaaa-0000-0000-0000-000000000001 h2")
            page.screenshot(path=os.path.join(tempfile.gettempdir(), "gallery.png"), full_page=True)
        finally:
            browser.close()
    assert time.monotonic() - started < 15


# ---------------------------------------------------------------- object store


@pytest.fixture
def gcs_bucket() -> Any:
    """An in-memory GCS emulator with bucket ``gallery``; Beam talks to it anonymously."""
    from gcs import storage_emulator

    with storage_emulator("gallery"):
        yield "gs://gallery"


def test_gallery_on_an_object_store(gcs_bucket: str, tmp_path: Path) -> None:
    from apache_beam.io.filesystems import FileSystems

    from beam_captions.io.files import write_bytes

    local, _ = review_dataset(tmp_path / "local")
    output = f"{gcs_bucket}/run"
    for path in sorted(Path(local).rglob("*.json")):
        write_bytes(f"{output}/{path.relative_to(local).as_posix()}", path.read_bytes())
    write_bytes(f"{output}/index-9.html", b"stale")
    assert write_gallery(output) == f"{output}/index.html"
    write_gallery(local)
    with FileSystems.open(f"{output}/index.html") as handle:
        assert handle.read() == (Path(local) / "index.html").read_bytes()  # same layout, same page
    pages = [m.path for m in FileSystems.match([f"{output}/index*.html"])[0].metadata_list]
    assert pages == [f"{output}/index.html"]
