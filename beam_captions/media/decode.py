"""Decode a clip into caption windows with one decoding pass.

A cheap demux-only pass counts the video packets, which fixes the windows and
the set of wanted frames (model samples and preview frames). One decoding pass
then converts only the wanted frames to RGB, resized in the same swscale call.
Windows are handed out during that pass as soon as they are complete and final:
only the last one or two windows of a clip depend on its frame count. When the
decoded frame count differs from the packet count (corrupt or cut streams), the
windows not yet handed out are recomputed from the decoded count and decoded
in a second pass.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, BinaryIO, Union

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from beam_captions.limits import MAX_DECODE_THREADS
from beam_captions.local import available_cores
from beam_captions.media.windowing import (
    MIN_FRAMES,
    MIN_PREVIEW_FRAMES,
    FrameWindow,
    compute_windows,
    preview_frame_indices,
    preview_frame_indices_by_time,
    sample_frame_indices,
    sample_frame_indices_by_time,
)

__all__ = [
    "DecodeError",
    "VideoInfo",
    "Orientation",
    "PreviewSpec",
    "DecodedWindow",
    "FrameSize",
    "automatic_threads",
    "preview_size",
    "decode_windows",
    "iter_decode",
    "orientation_from_matrix",
]

log = logging.getLogger(__name__)

_INTERPOLATION = "AREA"
DEFAULT_DECODE_THREADS = 0
"""Decoder threads per clip. 0 (default): automatic, ``automatic_threads``: a clip gets this process's
cores divided among the clips it decodes at that moment, itself included, so a clip alone uses every core
and clips decoded side by side (a local run's worker threads) one thread each, the least CPU per window
(frame threading adds 4-12 % CPU seconds, benchmarks P10). 1: always one, the choice where many
processes decode clips at once, as on Dataflow workers (``--decode-threads 1``)."""
FRAME_SKIP_CODECS = frozenset({"h264", "hevc"})
"""Codecs (FFmpeg codec names) whose frames that nobody keeps and no frame refers to may go undecoded
(``skip_frame`` "nonref"). Proven to give the frame count and kept frames of a full decode by the codec
matrix (tests/test_codec_matrix.py); every other codec is decoded whole (MPEG-4 Part 2's packed B-frames,
two frames in one packet, broke the count)."""

THREADED_CODECS = frozenset({
    "h264", "hevc", "mpeg4", "mpeg1video", "mpeg2video", "vp8", "vp9", "av1", "theora", "mjpeg", "prores",
    "dnxhd", "ffv1", "wmv2", "flv1", "h263",
})
"""Codecs decoded on several threads when a clip gets more than one: the codec matrix proves each one gives
the frames of a one-thread decode. Any other codec gets one thread."""

Source = Union[str, os.PathLike, BinaryIO]
Size = tuple[int, int]
FrameSize = Callable[[int, int, int], Size]
"""How large a window's model frames are: (clip width, clip height as displayed, the window's sampled frame
count) -> the frames' (width, height). The caller's model decides (e.g. ``FrameBounds.frame_size``)."""
ModelSize = Callable[[int], Size]  # a window's sampled frame count -> its model frames' (width, height)


class DecodeError(Exception):
    """The input cannot be turned into caption windows (not a video, corrupt, too short...)."""


@dataclass(frozen=True)
class VideoInfo:
    """What decoding learnt about a clip; ``num_frames`` is the decoded frame count."""

    width: int
    height: int
    fps: float
    num_frames: int
    codec: str
    duration_s: float
    display_width: int = 0  # as shown: sample aspect ratio and display rotation applied (0: same as coded)
    display_height: int = 0
    rotation: int = 0  # the display rotation applied (0, 90, 180, 270), as a ``rotate`` tag gives it
    # what went wrong while reading it, once per kind (``beam_captions.logs.WARNING_KINDS``): (kind, text)
    warnings: tuple[tuple[str, str], ...] = ()
    lost_frames: int = 0  # frames demuxed that gave no picture (packets minus decoded frames)
    # those frames as (first, last) source frame indices in presentation order, when the timestamps tell
    lost_frame_ranges: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.display_width:
            object.__setattr__(self, "display_width", self.width)
        if not self.display_height:
            object.__setattr__(self, "display_height", self.height)


@dataclass(frozen=True)
class Orientation:
    """How coded frames become displayed ones: the sample aspect ratio stretches the width, then the
    display matrix turns (clockwise quarter turns) and may mirror them, as FFmpeg's autorotate does."""

    sar: float = 1.0
    transform: str = ""  # "", "clock", "cclock", "clock_flip", "cclock_flip", "hflip", "vflip", "hflip+vflip"

    @property
    def quarter_turn(self) -> bool:
        return self.transform in ("clock", "cclock", "clock_flip", "cclock_flip")

    @property
    def rotation(self) -> int:
        """The display rotation in degrees as a ``rotate`` tag (and ffprobe's old ``rotate``) gives it."""
        return {"cclock": 90, "cclock_flip": 90, "clock": 270, "clock_flip": 270, "hflip+vflip": 180}.get(
            self.transform, 0)

    def display_size(self, width: int, height: int) -> Size:
        """The coded ``width x height`` as displayed."""
        shown = max(1, round(width * self.sar)) if self.sar > 0 else width
        return (height, shown) if self.quarter_turn else (shown, height)

    def coded_size(self, width: int, height: int) -> Size:
        """The size to scale a coded frame to so that, once turned, it is ``width x height``."""
        return (height, width) if self.quarter_turn else (width, height)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` (H, W, 3), scaled to ``coded_size``, as displayed."""
        t = self.transform
        if t == "clock":
            return np.rot90(rgb, -1)
        if t == "cclock":
            return np.rot90(rgb, 1)
        if t == "cclock_flip":
            return rgb.transpose(1, 0, 2)
        if t == "clock_flip":
            return rgb.transpose(1, 0, 2)[::-1, ::-1]
        if t == "hflip":
            return rgb[:, ::-1]
        if t == "vflip":
            return rgb[::-1]
        if t == "hflip+vflip":
            return rgb[::-1, ::-1]
        return rgb


def orientation_from_matrix(matrix: Sequence[int] | None, sar: float = 1.0) -> Orientation:
    """FFmpeg's autorotate choice (fftools) for a display matrix of 9 int32 values (16.16 fixed point)."""
    if matrix is None:
        return Orientation(sar)
    m = [float(v) for v in matrix]
    scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if scale0 == 0 or scale1 == 0:
        return Orientation(sar)
    # fftools' get_rotation: minus av_display_rotation_get (counter-clockwise), i.e. the clockwise angle
    theta = round(math.degrees(math.atan2(m[1] / scale1, m[0] / scale0)))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return Orientation(sar, "cclock_flip" if m[3] > 0 else "clock")
    if abs(theta - 180) < 1:
        flips = [name for name, negative in (("hflip", m[0] < 0), ("vflip", m[4] < 0)) if negative]
        return Orientation(sar, "+".join(flips))
    if abs(theta - 270) < 1:
        return Orientation(sar, "clock_flip" if m[3] < 0 else "cclock")
    if abs(theta) < 1 and m[4] < 0:
        return Orientation(sar, "vflip")
    return Orientation(sar)


@dataclass(frozen=True)
class PreviewSpec:
    """Frame rate and height of the per-window previews."""

    target_fps: float = 1.0
    target_height: int = 240

    def __post_init__(self) -> None:
        if not self.target_fps > 0:
            raise ValueError(f"target_fps must be positive, got {self.target_fps}")
        if self.target_height < 2:
            raise ValueError(f"target_height must be >= 2, got {self.target_height}")


@dataclass
class DecodedWindow:
    """Model frames (T,H,W,3) and optional preview frames (N,h,w,3), uint8 RGB, of a clip at ``fps``."""

    window: FrameWindow
    frame_indices: list[int]
    frames: np.ndarray | None
    preview_frames: np.ndarray | None
    fps: float
    start_time: float | None = None  # presentation times (s from the first frame), when known
    end_time: float | None = None

    @property
    def start_s(self) -> float:
        return self.start_time if self.start_time is not None else self.window.start / self.fps

    @property
    def end_s(self) -> float:
        """Where the window's last frame stops being shown (its successor's time)."""
        return self.end_time if self.end_time is not None else (self.window.end + 1) / self.fps


@dataclass(frozen=True)
class _Plan:
    """Windows and the source frames each one wants."""

    fps: float
    windows: list[FrameWindow]
    model_indices: list[list[int]]
    preview_indices: list[list[int]] | None
    times: Sequence[float] | None = None  # each frame's presentation time, and the end of the last


def preview_size(width: int, height: int, target_height: int) -> Size:
    """Preview size at ``target_height``; the width keeps the aspect ratio, rounded to even."""
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    return max(2, round(width * target_height / height / 2) * 2), target_height


def _is_path(source: Source) -> bool:
    return isinstance(source, (str, os.PathLike))


def _describe(source: Source) -> str:
    return os.fspath(source) if _is_path(source) else "<file object>"


def _not_a_video_file(path: str) -> str | None:
    """Why ``path`` cannot be a clip, told without opening it (a FIFO would block): ``None`` for a
    non-empty regular file."""
    import errno
    import stat

    try:
        info = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            if exc.errno == errno.ELOOP:
                return f"{path} is a symbolic link that loops (it never reaches a file)"
            if exc.errno == errno.ENOENT:
                return f"{path} is a dangling symbolic link (its target {os.readlink(path)} does not exist)"
        if exc.errno == errno.ENOENT:
            return f"cannot read {path}: it does not exist"
        return f"cannot read {path}: {exc}"
    mode = info.st_mode
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    for test, kind in kinds:
        if test(mode):
            return f"{path} is {kind}, not a video file; it was not read"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file; it was not read"
    if info.st_size == 0:
        return f"{path} is empty (0 bytes)"
    if not os.access(path, os.R_OK):
        return f"cannot read {path}: permission denied"
    return None


def _check_not_empty(source: Source) -> None:
    """A path must be a non-empty regular file (never opened otherwise); a file object must hold bytes."""
    if _is_path(source):
        reason = _not_a_video_file(os.fspath(source))
        if reason:
            raise DecodeError(reason)
        return
    if not source.seekable():
        raise ValueError("decode_windows needs a seekable file object")
    if source.seek(0, os.SEEK_END) == 0:
        raise DecodeError(f"{_describe(source)} is empty (0 bytes)")


@contextmanager
def _open(source: Source) -> Iterator[av.container.InputContainer]:
    """Open ``source`` from its first byte; PyAV errors while reading become ``DecodeError``."""
    name = _describe(source)
    if not _is_path(source):
        source.seek(0)
    try:
        container = av.open(source, "r", metadata_errors="replace")
    except av.error.FFmpegError as exc:
        raise DecodeError(f"{name} is not a readable media file: {exc}") from exc
    try:
        with container:
            yield container
    except av.error.FFmpegError as exc:
        raise DecodeError(f"{name}: {exc}") from exc


def _video_stream(container: av.container.InputContainer, name: str) -> av.VideoStream:
    """First video stream that is not embedded cover art."""
    if not container.streams:
        raise DecodeError(f"{name} has no readable streams (truncated, or not a video?)")
    attached_pic = av.stream.Disposition.attached_pic
    candidates = [stream for stream in container.streams.video if not stream.disposition & attached_pic]
    if not candidates:
        raise DecodeError(f"{name} has no video stream")
    for stream in candidates:  # the one flagged default, else the first
        if stream.disposition & av.stream.Disposition.default:
            return stream
    return candidates[0]


class _Notes(dict):
    """A clip's reading problems, kind -> text, the first of each kind kept: a clip read by several passes
    (probe, decode, decode again) meets the same bad packets in each, and is told once per kind."""

    def add(self, kind: str, text: str) -> None:
        log.debug("%s", text)
        self.setdefault(kind, text)


def _packets(container: av.container.InputContainer, stream: av.VideoStream, notes: _Notes) -> Iterator[av.Packet]:
    """Non-empty packets of ``stream``; a demux error ends the stream (cut files)."""
    try:
        for packet in container.demux(stream):
            if packet.size:
                yield packet
    except av.error.FFmpegError as exc:
        notes.add("demux_error", f"stopped reading packets after a demux error: {exc}")


def _decoded_frames(
    container: av.container.InputContainer, stream: av.VideoStream, deadline: "_Deadline", notes: _Notes,
    frames: "_FrameIndex | None" = None,
) -> Iterator[av.VideoFrame]:
    """Every frame the decoder produces; packets it rejects are skipped. ``frames`` sets the decoder's
    options for each packet and hears of the packets it rejects."""
    errors = 0
    for packet in _packets(container, stream, notes):
        deadline.check()
        if frames is not None:
            frames.before_packet(packet, stream.codec_context)
        try:
            decoded = packet.decode()
        except av.error.FFmpegError as exc:
            if frames is not None:
                frames.rejected(packet)
            errors += 1
            log.debug("skipping undecodable packet: %s", exc)
            continue
        yield from decoded
    try:
        yield from stream.codec_context.decode(None)
    except av.error.FFmpegError as exc:
        errors += 1
        log.debug("decoder flush failed: %s", exc)
    if errors:
        notes.add("undecodable_packets", f"{errors} video packets could not be decoded")


def _clip_fps(stream: av.VideoStream, container: av.container.InputContainer, num_frames: int) -> float:
    """Average frame rate; else frames over the stream or container duration."""
    if stream.average_rate and stream.average_rate > 0:
        return float(stream.average_rate)
    duration_s = 0.0
    if stream.duration and stream.time_base:
        duration_s = float(stream.duration * stream.time_base)
    elif container.duration:
        duration_s = container.duration / av.time_base
    if duration_s > 0 and num_frames > 0:
        return num_frames / duration_s
    raise DecodeError("the video stream has no usable frame rate or duration")


def _plan(
    total: int,
    fps: float,
    window_size: int,
    remainder_threshold: int,
    sampling_fps: float,
    preview: PreviewSpec | None,
    min_frames: int,
    times: Sequence[float] | None = None,
) -> _Plan:
    """Windows of ``total`` frames (none below ``min_frames``); sampled by presentation time when ``times``
    (one per frame and the end of the last) are known, else by frame index at ``fps``."""
    windows = compute_windows(total, window_size, remainder_threshold, min_frames)
    if times is not None and len(times) == total + 1:
        model = [sample_frame_indices_by_time(w, times, sampling_fps) for w in windows]
        previews = None if preview is None else [
            preview_frame_indices_by_time(w, times, preview.target_fps) for w in windows]
        return _Plan(fps, windows, model, previews, tuple(times))
    model = [sample_frame_indices(w, fps, sampling_fps) for w in windows]
    previews = None if preview is None else [preview_frame_indices(w, fps, preview.target_fps) for w in windows]
    return _Plan(fps, windows, model, previews)


def _targets(plan: _Plan, with_model: bool) -> dict[int, list[tuple[int, str, int]]]:
    """Map a source frame index to the (window, kind, slot) places it fills."""
    targets: dict[int, list[tuple[int, str, int]]] = {}
    for i in range(len(plan.windows)):
        for slot, index in enumerate(plan.model_indices[i] if with_model else ()):
            targets.setdefault(index, []).append((i, "model", slot))
        for slot, index in enumerate(plan.preview_indices[i] if plan.preview_indices else ()):
            targets.setdefault(index, []).append((i, "preview", slot))
    return targets


class _WindowBuffers:
    """Output arrays of the windows being filled; a window is allocated at its first frame."""

    def __init__(self, plan: _Plan, model_size: ModelSize | None, preview: Size | None, ready_at: list[int]):
        self.plan, self.model_size, self.preview = plan, model_size, preview
        self.open: dict[int, DecodedWindow] = {}
        self.filled: dict[int, int] = {}  # frames put in each open window
        self.ready_at = ready_at

    def _new(self, i: int) -> DecodedWindow:
        plan, model, preview = self.plan, self.model_size, self.preview
        frames = None
        if model is not None:
            width, height = model(len(plan.model_indices[i]))
            frames = np.empty((len(plan.model_indices[i]), height, width, 3), np.uint8)
        previews = None
        if plan.preview_indices is not None and preview is not None:
            previews = np.empty((len(plan.preview_indices[i]), preview[1], preview[0], 3), np.uint8)
        window = plan.windows[i]
        start_time = end_time = None
        if plan.times is not None:
            start_time, end_time = plan.times[window.start], plan.times[window.end + 1]
        return DecodedWindow(window, plan.model_indices[i], frames, previews, plan.fps, start_time, end_time)

    def array(self, i: int, kind: str) -> np.ndarray | None:
        window = self.open.get(i) or self.open.setdefault(i, self._new(i))
        self.filled[i] = self.filled.get(i, 0) + 1
        return window.frames if kind == "model" else window.preview_frames

    def _take(self, i: int) -> DecodedWindow:
        """Window ``i``, released; every slot of its arrays must hold a decoded frame."""
        window = self.open.pop(i)
        slots = sum(len(a) for a in (window.frames, window.preview_frames) if a is not None)
        if self.filled.pop(i) != slots:
            raise DecodeError(f"window {window.window.start}-{window.window.end} did not get all its frames")
        return window

    def ready(self, decoded_count: int) -> Iterator[DecodedWindow]:
        """Windows that are ready at ``decoded_count`` decoded frames, in order, released from the buffer."""
        for i in sorted(self.open):
            if self.ready_at[i] <= decoded_count:
                yield self._take(i)

    def rest(self) -> list[DecodedWindow]:
        """The windows not yielded, in order, once every frame is in."""
        return [self._take(i) for i in sorted(self.open)]


def _last_wanted(plan: _Plan, i: int) -> int:
    return max(plan.model_indices[i] + (plan.preview_indices[i] if plan.preview_indices else []))


def _complete_at(plan: _Plan) -> list[int]:
    """Decoded count at which each window of ``plan`` has all its frames."""
    return [_last_wanted(plan, i) + 1 for i in range(len(plan.windows))]


def _final_at(plan: _Plan, window_size: int, remainder_threshold: int) -> list[int]:
    """Decoded count at which each window is complete and can no longer change, whatever the clip's total.

    Only the last windows depend on the total: once ``(k + 1) * window_size + remainder_threshold``
    frames exist, window ``k`` is followed by a full window or by a remainder long enough to be its
    own, so it keeps its span and samples.
    """
    return [
        max(_last_wanted(plan, i) + 1, (window.index + 1) * window_size + remainder_threshold)
        for i, window in enumerate(plan.windows)
    ]


@dataclass(frozen=True)
class _Shortcuts:
    """How a pass may save CPU: decoder threads, and each packet's presentation index by its timestamp,
    which lets the decoder skip the frames nobody keeps (``None``: decode every frame). ``_PLAIN`` is the
    full one-thread decode every shortcut must equal."""

    threads: int = 1
    frame_at: dict[int, int] | None = None

    @property
    def any(self) -> bool:
        return self.threads > 1 or self.frame_at is not None


_PLAIN = _Shortcuts()


def _shortcuts_for(codec: str, threads: int, frame_at: dict[int, int] | None, skip: bool) -> _Shortcuts:
    """The shortcuts proven for ``codec`` (``FRAME_SKIP_CODECS``, ``THREADED_CODECS``), else none."""
    return _Shortcuts(min(threads, MAX_DECODE_THREADS) if codec in THREADED_CODECS else 1,
                      frame_at if skip and codec in FRAME_SKIP_CODECS else None)


@dataclass
class _Pass:
    """What a decode pass found: frames in the clip, the timestamps of those it decoded, and the trouble
    (an undecodable packet, a damaged or misplaced frame) that stopped a pass with shortcuts early."""

    total: int = 0
    pts: list[int] = field(default_factory=list)
    trouble: str | None = None


def _decode_pass(
    source: Source,
    plan: _Plan,
    model_size: ModelSize | None,
    preview: Size | None,
    deadline: "_Deadline",
    ready_at: list[int],
    orientation: Orientation,
    notes: _Notes,
    given: list[FrameWindow],
    shortcuts: _Shortcuts = _PLAIN,
) -> Iterator[DecodedWindow]:
    """Decode the clip, keep the planned frames, yield each window once ``ready_at`` frames are decoded.

    Windows are appended to ``given`` as they are yielded; those ``given`` already holds (a prefix of the
    plan, from an earlier pass) are neither filled nor yielded. Returns (as the generator's value) a
    ``_Pass``, and the buffers of the windows not yielded. Kept frames go through one reformatter per output size, so
    swscale contexts are reused. ``model_size`` gives each window's model frame size from its sampled
    frame count.

    With ``shortcuts`` the decoder may skip the frames no other frame refers to (FFmpeg's ``skip_frame``
    "nonref", set per packet) unless the plan keeps them, and run on several threads: the same kept
    frames as a full decode on the codecs proven for it, for less CPU (benchmarks P1, P10). At the first
    sign of damage such a pass stops and says why: damaged streams are decoded by the plain pass alone,
    so every run gives the same windows.
    """
    first = len(given)
    buffers = _WindowBuffers(plan, model_size, preview, ready_at)
    pending = sorted(set(ready_at[first:]))
    targets = {index: [place for place in places if place[0] >= first]
               for index, places in _targets(plan, with_model=model_size is not None).items()}
    reformatters: dict[Size, VideoReformatter] = {}
    count = 0
    frames = _FrameIndex(shortcuts.frame_at, targets)
    result = _Pass()
    with _open(source) as container:
        stream = _video_stream(container, _describe(source))
        _set_threads(stream, shortcuts.threads)
        for frame in _decoded_frames(container, stream, deadline, notes, frames):
            index = frames.index_of(frame, count)
            if shortcuts.any:
                result.trouble = frames.trouble or ("a damaged frame" if frame.is_corrupt else None)
                if result.trouble:
                    return result, buffers
            result.pts.append(frame.pts)
            for i, kind, slot in targets.get(index, ()):
                array = buffers.array(i, kind)
                width, height = orientation.coded_size(array.shape[2], array.shape[1])
                if (width, height) not in reformatters:
                    reformatters[width, height] = VideoReformatter()
                rgb = reformatters[width, height].reformat(frame, width, height, "rgb24", interpolation=_INTERPOLATION)
                array[slot] = orientation.apply(rgb.to_ndarray())
            count = index + 1
            if pending and count >= pending[0]:
                pending = [n for n in pending if n > count]
                yield from _hand_on(deadline.paused(buffers.ready(count)), given)
    result.trouble = frames.trouble if shortcuts.any else None
    result.total = frames.total(count)
    return result, buffers


class _FrameIndex:
    """Where each decoded frame belongs (its presentation index), which packets may go undecoded, and
    the first sign that the stream is damaged (``trouble``)."""

    def __init__(self, frame_at: dict[int, int] | None, targets: dict[int, Any]):
        self.frame_at, self.targets = frame_at, targets
        self.skippable: set[int] = set()  # indices of packets sent with "skip if no frame refers to it"
        self.output = 0  # frames the decoder gave
        self.skipped = 0  # frames it skipped before the last one it gave
        self.trouble: str | None = None

    def before_packet(self, packet: av.Packet, context: av.CodecContext) -> None:
        if self.frame_at is None:
            context.skip_frame = "DEFAULT"
            return
        index = self.frame_at.get(packet.pts)
        keep = index is None or index in self.targets
        context.skip_frame = "DEFAULT" if keep else "NONREF"
        if not keep:
            self.skippable.add(index)

    def rejected(self, packet: av.Packet) -> None:
        """The decoder could not decode ``packet``: its frame is missing, not skipped."""
        self.trouble = self.trouble or "an undecodable packet"
        if self.frame_at is not None:
            self.skippable.discard(self.frame_at.get(packet.pts))

    def index_of(self, frame: av.VideoFrame, count: int) -> int:
        """The frame's presentation index: by its timestamp while every frame it passes over was one the
        decoder was allowed to skip; else (a frame the timestamps do not place) the count of frames
        before it, as without skipping, and no more skipping."""
        self.output += 1
        if self.frame_at is not None:
            index = self.frame_at.get(frame.pts)
            if index is not None and index >= count and all(i in self.skippable for i in range(count, index)):
                self.skipped += index - count
                return index
            self.frame_at = None
            self.trouble = self.trouble or "a frame its timestamp does not place"
        return count

    def total(self, count: int) -> int:
        """Frames the clip has: those decoded and those skipped (the trailing ones included)."""
        trailing = sum(1 for i in self.skippable if i >= count) if self.frame_at is not None else 0
        return self.output + self.skipped + trailing


def _set_threads(stream: av.VideoStream, threads: int) -> None:
    """``threads`` decoder threads (more than one: frame and slice threading)."""
    if threads == 1:
        stream.codec_context.thread_count = 1
    else:
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads


def automatic_threads(under_way: int, cores: int) -> int:
    """Decoder threads for a clip that starts while ``under_way`` other clips are being decoded on ``cores``."""
    return max(1, cores // (under_way + 1))


class _ClipsUnderWay:
    """The clips this process is decoding now (``DEFAULT_DECODE_THREADS``' automatic choice counts them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    @contextmanager
    def clip(self, decode_threads: int) -> Iterator[int]:
        """One clip decoding from entry to exit; yields its thread count (``decode_threads``, or automatic for 0)."""
        with self._lock:
            threads = decode_threads or automatic_threads(self.count, available_cores())
            self.count += 1
        try:
            yield threads
        finally:
            with self._lock:
                self.count -= 1


_CLIPS_UNDER_WAY = _ClipsUnderWay()


class _Deadline:
    """Raises ``DecodeError`` once decoding a clip has taken longer than its time budget.

    Only decoding counts: the time a consumer holds a yielded window (previews, batching, captioning)
    is left out, see ``paused``.
    """

    def __init__(self, source: Source, budget_s: float | None):
        self.source, self.budget_s = source, budget_s
        self.spent = 0.0
        self.since = time.monotonic()

    def check(self) -> None:
        if self.budget_s is not None and self.spent + time.monotonic() - self.since > self.budget_s:
            raise DecodeError(f"{_describe(self.source)}: decoding exceeded the time budget of {self.budget_s:g} s")

    def paused(self, items: Iterable[DecodedWindow]) -> Iterator[DecodedWindow]:
        """Yield ``items`` with the clock stopped while each one is out with the consumer."""
        for item in items:
            self.spent += time.monotonic() - self.since
            yield item
            self.since = time.monotonic()


def _require_min_frames(num_frames: int, model_frames: bool) -> None:
    """Captions need ``MIN_FRAMES`` frames a window; previews alone (no model frames) need one."""
    if model_frames and num_frames < MIN_FRAMES:
        raise DecodeError(f"clip has {num_frames} frames; at least {MIN_FRAMES} are needed for a caption window")
    if num_frames < MIN_PREVIEW_FRAMES:
        raise DecodeError(f"clip has {num_frames} frames; at least {MIN_PREVIEW_FRAMES} is needed for a preview")


def _check_options(
    sampling_fps: float, max_pixels_per_frame_source: int | None, frame_size: FrameSize | None, model_frames: bool
) -> None:
    if model_frames and frame_size is None:
        raise ValueError("model frames need a frame_size (or model_frames=False for previews only)")
    if not sampling_fps > 0:
        raise ValueError(f"sampling_fps must be positive, got {sampling_fps}")
    if max_pixels_per_frame_source is not None and max_pixels_per_frame_source <= 0:
        raise ValueError(f"max_pixels_per_frame_source must be positive, got {max_pixels_per_frame_source}")


def _display_matrix(packet: av.Packet) -> tuple[bool, list[int] | None]:
    """Whether ``packet`` gave a frame, and that frame's display matrix (PyAV exposes none on the stream)."""
    try:
        frames = packet.decode()
    except av.error.FFmpegError:
        return False, None
    if not frames:
        return False, None
    # a mapping from PyAV 18.1.1 on (iterating it gives its keys), a sequence with ``get`` before
    side = frames[0].side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    return True, None if side is None else np.frombuffer(bytes(side), dtype="<i4", count=9).tolist()


def _presentation_times(pts: list[int], durations: list[int], time_base, fps: float) -> list[float] | None:
    """Each frame's presentation time in seconds from the first frame, and the end of the last: the
    packets' timestamps in presentation order. ``None`` when a packet has none."""
    if not pts or time_base is None or len(pts) != len(durations):
        return None
    order = sorted(range(len(pts)), key=pts.__getitem__)
    first = pts[order[0]]
    times = [float((pts[i] - first) * time_base) for i in order]
    last = durations[order[-1]]
    times.append(times[-1] + (float(last * time_base) if last and last > 0 else 1.0 / fps))
    steps = np.diff(times[:-1])
    tolerance = max(0.01 * float(steps.mean()), 1.5 * float(time_base)) if len(steps) else 0.0
    if len(steps) and float(steps.max() - steps.min()) <= tolerance:
        # a constant frame rate (timestamps rounded to the time base, as Matroska's milliseconds):
        # frame index / fps says the same, without the rounding noise
        return None
    return times


def _probe(
    source: Source, max_source_pixels: int | None, notes: _Notes
) -> tuple[int, int, str, int, float, list[float] | None, Orientation, dict[int, int] | None]:
    """Demux pass: width, height, codec name, packet count, clip fps, presentation times, orientation and
    each packet's presentation index by its timestamp (``None`` unless every packet has its own).

    Only the packets up to the first frame are decoded (its display matrix says how the clip is shown).
    Packets an edit list discards are not counted: the decoder drops their frames too (so such a clip is
    not decoded twice)."""
    name = _describe(source)
    with _open(source) as container:
        stream = _video_stream(container, name)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise DecodeError(f"{name}: the video stream has no frame size")
        if max_source_pixels is not None and width * height > max_source_pixels:
            raise DecodeError(f"{name}: {width}x{height} frames exceed the limit of {max_source_pixels} pixels")
        sar = stream.codec_context.sample_aspect_ratio or stream.sample_aspect_ratio
        ratio = float(sar) if sar and sar > 0 else 1.0
        pts: list[int] = []
        durations: list[int] = []
        count, timed, seen_frame, matrix = 0, True, False, None
        for packet in _packets(container, stream, notes):
            if not seen_frame:
                seen_frame, matrix = _display_matrix(packet)
            if packet.is_discard:
                continue
            count += 1
            if packet.pts is None:
                timed = False
            elif timed:
                pts.append(packet.pts)
                durations.append(packet.duration or 0)
        fps = _clip_fps(stream, container, count)
        times = _presentation_times(pts, durations, stream.time_base, fps) if timed else None
        orientation = orientation_from_matrix(matrix, ratio if 0.01 < ratio < 100 else 1.0)
        frame_at = {value: i for i, value in enumerate(sorted(pts))} if timed and len(set(pts)) == count else None
        return width, height, stream.codec_context.codec.canonical_name, count, fps, times, orientation, frame_at


def iter_decode(
    source: Source,
    *,
    window_size: int = 256,
    remainder_threshold: int = 128,
    sampling_fps: float = 2.0,
    frame_size: FrameSize | None = None,
    preview: PreviewSpec | None = None,
    model_frames: bool = True,
    max_pixels_per_frame_source: int | None = None,
    time_budget_s: float | None = None,
    decode_threads: int = DEFAULT_DECODE_THREADS,
    skip_unkept_frames: bool = True,
) -> Iterator[Union[DecodedWindow, VideoInfo]]:
    """Cut a clip into caption windows and decode their model (and preview) frames.

    Yields ``DecodedWindow``s and, last, the clip's ``VideoInfo``. Each window is yielded
    as soon as its frames are in and no frame count could change it, so memory holds a
    window or two whatever the clip's length. Each window's model frames are sized by
    ``frame_size`` for its own sampled frame count (required unless ``model_frames=False``,
    which skips the model frames: previews only; then a clip needs one frame, not the
    ``MIN_FRAMES`` of a caption window). ``max_pixels_per_frame_source`` refuses
    clips with larger frames before decoding; ``time_budget_s`` stops a clip that decodes
    too slowly. ``decode_threads`` decoder threads (default ``DEFAULT_DECODE_THREADS``; 1: the least
    CPU per frame; 0: automatic, every core for a clip decoded alone, one each for clips side by side). ``skip_unkept_frames`` lets the
    decoder skip frames that are neither kept nor referred to by another frame (the same kept frames
    for less CPU). ``source`` is a path or a seekable binary file object holding the whole
    clip. Raises ``DecodeError`` for unusable inputs. Reading problems that did not stop it
    (undecodable packets, a demux error, a second pass) are in ``VideoInfo.warnings``, once
    per kind; the caller tells them (this function logs them only at debug level, or at info
    level for a clip that fails).
    """
    notes = _Notes()
    try:
        yield from _iter_decode(source, notes, window_size, remainder_threshold, sampling_fps, frame_size, preview,
                                model_frames, max_pixels_per_frame_source, time_budget_s, decode_threads,
                                skip_unkept_frames)
    except Exception:
        for text in notes.values():
            log.info("%s: %s", _describe(source), text)
        raise


def _iter_decode(
    source: Source,
    notes: _Notes,
    window_size: int,
    remainder_threshold: int,
    sampling_fps: float,
    frame_size: FrameSize | None,
    preview: PreviewSpec | None,
    model_frames: bool,
    max_pixels_per_frame_source: int | None,
    time_budget_s: float | None,
    decode_threads: int = DEFAULT_DECODE_THREADS,
    skip_unkept_frames: bool = True,
) -> Iterator[Union[DecodedWindow, VideoInfo]]:
    if decode_threads < 0:
        raise ValueError(f"decode_threads must be >= 0, got {decode_threads}")
    deadline = _Deadline(source, time_budget_s)
    _check_options(sampling_fps, max_pixels_per_frame_source, frame_size, model_frames)
    _check_not_empty(source)
    width, height, codec, packet_count, fps, times, orientation, frame_at = _probe(
        source, max_pixels_per_frame_source, notes)
    shown_width, shown_height = orientation.display_size(width, height)
    model_size = partial(frame_size, shown_width, shown_height) if model_frames else None
    small = None if preview is None else preview_size(shown_width, shown_height, preview.target_height)
    min_frames = MIN_FRAMES if model_frames else MIN_PREVIEW_FRAMES  # frames-per-window limits are the captions'
    options = (fps, window_size, remainder_threshold, sampling_fps, preview, min_frames)
    plan = _plan(packet_count, *options, times)
    final_at = _final_at(plan, window_size, remainder_threshold)
    given: list[FrameWindow] = []
    run = partial(_decode_pass, source, model_size=model_size, preview=small, deadline=deadline,
                  orientation=orientation, notes=notes, given=given)
    with _CLIPS_UNDER_WAY.clip(decode_threads) as threads:
        shortcuts = _shortcuts_for(codec, threads, frame_at, skip_unkept_frames)
        found, buffers = yield from run(plan, ready_at=final_at, shortcuts=shortcuts)
        again_why = ""
        if shortcuts.any and (found.trouble or found.total != packet_count):
            # damaged or cut: the plain decode alone decides, so that every run gives the same windows
            again_why = f"decoded again without shortcuts from window #{len(given)} ({found.trouble or 'a cut'})"
            found, buffers = yield from run(plan, ready_at=final_at)
        decoded = found.total
        _require_min_frames(decoded, model_frames)
        if decoded == packet_count:
            if again_why:
                notes.add("decoded_twice", again_why)
            yield from _hand_on(buffers.rest(), given)
        else:
            notes.add("decoded_twice", f"decoded {decoded} frames but demuxed {packet_count} packets; "
                                       f"decoding again for the windows from #{len(given)}"
                                       + (f"; {again_why}" if again_why else ""))
            tail = _plan(decoded, *options)
            _require_prefix(source, given, tail.windows)
            again, buffers = yield from run(tail, ready_at=_complete_at(tail))
            _require_repeatable(source, decoded, again.total)
            yield from _hand_on(buffers.rest(), given)
    _require_every_window(source, given, compute_windows(decoded, window_size, remainder_threshold, min_frames))
    lost = max(0, packet_count - decoded)
    ranges = _lost_ranges(found.pts, frame_at, lost)
    if lost:
        where = f" (source frames {', '.join(f'{a}-{b}' for a, b in ranges)})" if ranges else ""
        notes.add("lost_frames", f"{lost} of {packet_count} frames could not be decoded{where}")
    duration_s = plan.times[-1] if plan.times is not None and decoded == packet_count else decoded / fps
    yield VideoInfo(width, height, fps, decoded, codec, duration_s, shown_width, shown_height, orientation.rotation,
                    tuple(notes.items()), lost, ranges)


def _hand_on(windows: Iterable[DecodedWindow], given: list[FrameWindow]) -> Iterator[DecodedWindow]:
    """Yield ``windows``, each recorded in ``given`` (what the clip's consumer has had)."""
    for window in windows:
        given.append(window.window)
        yield window


def _spans(windows: Iterable[FrameWindow]) -> list[tuple[int, int]]:
    return [(w.start, w.end) for w in windows]


def _require_prefix(source: Source, given: list[FrameWindow], windows: list[FrameWindow]) -> None:
    """The windows already given must be the first ones of the plan for the decoded count."""
    if _spans(given) != _spans(windows[:len(given)]):
        raise DecodeError(f"{_describe(source)}: decoding is not repeatable (windows {_spans(given)} were given, "
                          f"the decoded frames give {_spans(windows[:len(given)])})")


def _require_repeatable(source: Source, first: int, second: int) -> None:
    if first != second:
        raise DecodeError(f"{_describe(source)}: decoding is not repeatable ({first} then {second} frames)")


def _require_every_window(source: Source, given: list[FrameWindow], expected: list[FrameWindow]) -> None:
    """A clip is whole only when every window of the reference rule for its decoded frames was given."""
    if _spans(given) != _spans(expected):
        missing = [span for span in _spans(expected) if span not in _spans(given)]
        raise DecodeError(f"{_describe(source)}: windows {missing or _spans(expected)} of the decoded frames were "
                          f"not produced (produced {_spans(given)})")


def _lost_ranges(pts: list[int], frame_at: dict[int, int] | None, lost: int) -> tuple[tuple[int, int], ...]:
    """The source frames (presentation indices) that gave no picture, as ranges, when the decoded frames'
    timestamps account for exactly ``lost`` of them; else none (the count alone is known)."""
    if not lost or not pts or frame_at is None:
        return ()
    seen = {frame_at[p] for p in pts if p in frame_at}
    missing = [i for i in range(len(frame_at)) if i not in seen]
    if len(missing) != lost:
        return ()
    ranges: list[tuple[int, int]] = []
    for i in missing:
        if ranges and ranges[-1][1] == i - 1:
            ranges[-1] = (ranges[-1][0], i)
        else:
            ranges.append((i, i))
    return tuple(ranges)


def decode_windows(source: Source, **options) -> tuple[VideoInfo, list[DecodedWindow]]:
    """``iter_decode`` collected: the clip's ``VideoInfo`` and all its windows."""
    *windows, info = iter_decode(source, **options)
    return info, windows
