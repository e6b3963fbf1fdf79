"""PrepareWindows: one decode pass per clip gives its windows, model frames and preview frames."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import IO, Iterator, Optional, Union

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_captions.inference.frame_bounds import DEFAULT_FRAME_BOUNDS, FrameBounds, NemotronFrameSize, model_frame_bounds
from beam_captions.media.decode import DEFAULT_DECODE_THREADS, DecodedWindow, PreviewSpec, VideoInfo, iter_decode
from beam_captions.io.paths import is_local, local_path
from beam_captions.logs import warn
from beam_captions.metrics import count
from beam_captions.prompts import caption_prompt
from beam_captions.records import ClipInfo, ClipRef, Failure, WindowRecord, failure_from_exception

__all__ = ["PrepareConfig", "PrepareWindows", "prepare_clip", "preview_warnings"]

log = logging.getLogger(__name__)

DEFAULT_MAX_FRAME_PIXELS = 8192 * 4320  # 8K; larger frames are refused before decoding
DEFAULT_TIME_BUDGET_S = 900.0
_COPY_CHUNK = 8 << 20  # bytes per read while fetching a remote clip


@dataclass(frozen=True)
class PrepareConfig:
    """How a clip is cut and sampled, and how large its frames leave the step."""

    window_size: int = 256
    remainder_threshold: int = 128
    sampling_fps: float = 2.0
    frame_bounds: Union[FrameBounds, NemotronFrameSize] = DEFAULT_FRAME_BOUNDS
    preview: Optional[PreviewSpec] = None
    model_frames: bool = True
    max_frame_pixels: Optional[int] = DEFAULT_MAX_FRAME_PIXELS
    time_budget_s: Optional[float] = DEFAULT_TIME_BUDGET_S
    decode_threads: int = DEFAULT_DECODE_THREADS  # per clip; 0: FFmpeg's automatic (more CPU, less wall), 1: least CPU


def _preview_warnings(info: VideoInfo, preview: Optional[PreviewSpec]) -> list[tuple[str, str]]:
    if preview is None:
        return []
    warnings = []
    if info.fps < preview.target_fps:
        warnings.append(("preview_fps",
                         f"source frame rate {info.fps:.3g} fps is below the preview target {preview.target_fps:.3g} fps"))
    if info.display_height < preview.target_height:
        warnings.append(("preview_height",
                         f"source height {info.display_height}px is below the preview target {preview.target_height}px"))
    return warnings


def preview_warnings(info: VideoInfo, preview: Optional[PreviewSpec]) -> tuple[str, ...]:
    """Why a clip's previews will look worse than asked (source slower or smaller than the target)."""
    return tuple(text for _, text in _preview_warnings(info, preview))


def _window_record(clip: ClipRef, decoded: DecodedWindow, preview: Optional[PreviewSpec]) -> WindowRecord:
    window = decoded.window
    return WindowRecord(
        clip_id=clip.clip_id,
        source=clip.source,
        window_index=window.index,
        start_frame=window.start,
        end_frame=window.end,
        start_s=decoded.start_s,
        end_s=decoded.end_s,
        frame_indices=tuple(decoded.frame_indices),
        frames=decoded.frames,
        preview_frames=decoded.preview_frames,
        preview_fps=preview.target_fps if preview else None,
        source_version=clip.version,
    )


class _LocalCopy:
    """The path FFmpeg reads a clip from: a local file as it is; anything else (``gs://``...) fetched once
    into a temporary file, so that probing and decoding do not fetch it again. ``close`` removes it."""

    def __init__(self, source: str):
        self.source = source
        self._file: Optional[IO[bytes]] = None

    def path(self) -> str:
        source = self.source
        if is_local(source):
            return local_path(source)
        self._file = tempfile.NamedTemporaryFile(prefix="beam-captions-", suffix=os.path.splitext(source)[1])
        with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as remote:
            shutil.copyfileobj(remote, self._file, _COPY_CHUNK)
        self._file.flush()
        return self._file.name

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def prepare_clip(clip: ClipRef, config: PrepareConfig) -> Iterator[Union[ClipInfo, WindowRecord, Failure]]:
    """Decode ``clip`` once: its ``WindowRecord``s as they complete, then its ``ClipInfo``; or a ``Failure``.

    A clip that fails part way keeps the windows it already gave and ends with its ``Failure``.
    """
    emitted = 0
    local = _LocalCopy(clip.source)
    try:
        for item in iter_decode(
            local.path(),
            window_size=config.window_size,
            remainder_threshold=config.remainder_threshold,
            sampling_fps=config.sampling_fps,
            frame_size=config.frame_bounds.frame_size,
            preview=config.preview,
            model_frames=config.model_frames,
            max_pixels_per_frame_source=config.max_frame_pixels,
            time_budget_s=config.time_budget_s,
            decode_threads=config.decode_threads,
        ):
            if isinstance(item, VideoInfo):
                info = item
            else:
                count("windows_prepared")
                emitted += 1
                yield _window_record(clip, item, config.preview)
    except Exception as error:  # noqa: BLE001 - any bad input becomes a failure record
        failure = failure_from_exception(error, source=clip.source, clip_id=clip.clip_id, stage="prepare")
        yield failure.replace(windows_before=emitted, found_at=clip.found_at, source_version=clip.version)
        return
    finally:
        local.close()
    count("clips_decoded")
    # reading problems (once per kind whatever the passes) and previews worse than asked: counted once per
    # clip and kind (the summary tells each kind once); each clip's in the log file and in its metas
    kinds = [*info.warnings, *_preview_warnings(info, config.preview)]
    for kind, warning in kinds:
        warn(kind, "%s: %s", clip.source, warning, logger=log)
    warnings = tuple(text for _, text in kinds)
    yield ClipInfo(
        clip_id=clip.clip_id,
        source=clip.source,
        width=info.width,
        height=info.height,
        fps=info.fps,
        num_frames=info.num_frames,
        codec=info.codec,
        duration_s=info.duration_s,
        num_windows=emitted,
        warnings=warnings,
        found_at=clip.found_at,
        source_version=clip.version,
        display_width=info.display_width,
        display_height=info.display_height,
        rotation=info.rotation,
        lost_frames=info.lost_frames,
        lost_frame_ranges=info.lost_frame_ranges,
    )


class PrepareWindows(beam.PTransform):
    """``ClipRef`` -> ``ClipInfo`` + ``WindowRecord``s (frames resized to the model's bound) or ``Failure``.

    Example: ``clips | PrepareWindows(window_size=256, model_dir="models/captioner")``. Model frames
    get the sizes of ``model_variant``'s family (Qwen: the reference's bounds, tightened by the model
    directory's video processor config; Nemotron: the checkpoint's frame size from its config.json),
    unless ``pixel_bounds`` is given (fixed per-frame ``(min, max)`` pixels, ``FrameBounds`` or
    ``NemotronFrameSize``). ``prompt_variant`` / ``prompt_text`` (the text wins), as the reference's
    preparation stage takes them, choose the caption prompt of these windows (``WindowRecord.prompt``):
    ``CaptionWindows`` uses it unless it is given a prompt of its own.
    """

    def __init__(
        self,
        *,
        window_size: int = 256,
        remainder_threshold: int = 128,
        sampling_fps: float = 2.0,
        model_dir: Optional[str] = None,
        model_variant: str = "qwen2.5",
        pixel_bounds: Union[tuple[int, int], FrameBounds, NemotronFrameSize, None] = None,
        preview: Optional[PreviewSpec] = None,
        model_frames: bool = True,
        max_frame_pixels: Optional[int] = DEFAULT_MAX_FRAME_PIXELS,
        time_budget_s: Optional[float] = DEFAULT_TIME_BUDGET_S,
        decode_threads: int = DEFAULT_DECODE_THREADS,
        prompt_variant: Optional[str] = None,
        prompt_text: Optional[str] = None,
        verbose: bool = False,
    ):
        super().__init__()
        self.verbose = verbose  # the reference's stages take it; here the log file has everything
        self.prompt: Optional[tuple[str, str]] = None  # (variant's name, text) each window carries
        if prompt_variant is not None or prompt_text is not None:
            variant = prompt_variant or "default"
            self.prompt = ("custom" if prompt_text else variant, caption_prompt(variant, prompt_text))
        if pixel_bounds is None:
            pixel_bounds = model_frame_bounds(model_dir, model_variant)
        elif not isinstance(pixel_bounds, (FrameBounds, NemotronFrameSize)):
            pixel_bounds = FrameBounds(*pixel_bounds)
        self.config = PrepareConfig(
            window_size, remainder_threshold, sampling_fps, pixel_bounds, preview, model_frames,
            max_frame_pixels, time_budget_s, decode_threads,
        )

    def expand(self, clips):
        config = self.config
        prepared = clips | "DecodeClip" >> beam.FlatMap(prepare_clip, config)
        if self.prompt is None:
            return prepared
        return prepared | "Prompt" >> beam.Map(self.with_prompt, *self.prompt)

    @staticmethod
    def with_prompt(element: object, variant: str, prompt: str) -> object:
        """``element``, a window with its caption prompt (``prompt``, of variant ``variant``) set."""
        return element.replace(prompt=prompt, prompt_variant=variant) if isinstance(element, WindowRecord) else element
