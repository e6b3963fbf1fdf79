"""How large the frames a video model sees are: the reference's video bounds per window (Qwen-VL), or the
checkpoint's own frame size (Nemotron, ``NemotronFrameSize``).

The reference (NeMo Curator, through qwen-vl-utils) sizes video frames by its own bounds,
whatever the checkpoint's *image* processor config says: 128 to 768 merged patches a frame
(28x28 pixels each for Qwen2.5-VL, 32x32 for Qwen3-VL), and 24576 patches for the whole video
as a further cap, so a window with many sampled frames gets smaller frames. A checkpoint's
*video* processor config may only tighten those bounds. Pure arithmetic plus one config read.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

from apache_beam.io.filesystems import FileSystems

from beam_captions.inference.variants import caption_model, canonical_variant
from beam_captions.io.files import read_json

__all__ = [
    "DEFAULT_FRAME_BOUNDS",
    "FACTORS",
    "FrameBounds",
    "NemotronFrameSize",
    "nemotron_frame_size",
    "model_frame_bounds",
    "reference_bounds",
    "resize_to_pixel_bound",
]

MIN_FRAME_TOKENS = 128
MAX_FRAME_TOKENS = 768
MAX_VIDEO_TOKENS = 24576
FRAME_FACTOR = 2  # frames per temporal patch: the whole-video cap is shared by frame pairs
FACTORS = {"qwen2.5": 28, "qwen3": 32}  # pixels per merged patch side (patch size x spatial merge)
VIDEO_CONFIG = "video_preprocessor_config.json"

Size = tuple[int, int]


def resize_to_pixel_bound(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = 2) -> Size:
    """Keep the aspect ratio and bring ``width * height`` into ``[min_pixels, max_pixels]``.

    qwen-vl-utils' ``smart_resize``: round both sides to multiples of ``factor`` (at least
    ``factor``), then scale down (sides floored) or up (sides ceiled) when the area is out of
    bounds. Where no size fits both bounds, the maximum wins.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    if not 0 <= min_pixels <= max_pixels:
        raise ValueError(f"need 0 <= min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    if factor < 1:
        raise ValueError(f"factor must be positive, got {factor}")

    def scaled(scale: float, rounding) -> Size:
        return max(factor, rounding(width * scale / factor) * factor), max(factor, rounding(height * scale / factor) * factor)

    def shrunk() -> Size:
        return scaled(math.sqrt(max_pixels / (width * height)), math.floor)

    size = scaled(1.0, round)
    if size[0] * size[1] > max_pixels:
        return shrunk()
    if size[0] * size[1] < min_pixels:
        size = scaled(math.sqrt(min_pixels / (width * height)), math.ceil)
        if size[0] * size[1] > max_pixels:
            return shrunk()
    return size


@dataclass(frozen=True)
class FrameBounds:
    """Per-frame pixel bounds of a window's model frames, and the multiple their sides are rounded to.

    ``total_pixels`` caps a whole window: with ``n`` sampled frames a frame gets at most
    ``total_pixels * 2 / n`` pixels, never less than ``1.05 * min_pixels``. ``video_min_pixels``
    and ``video_max_pixels`` (a checkpoint's video processor) narrow the result further;
    ``video_per_clip`` means they bound all of a window's frames together (Qwen3-VL).
    """

    min_pixels: int
    max_pixels: int
    factor: int = 2
    total_pixels: Optional[int] = None
    video_min_pixels: int = 0
    video_max_pixels: Optional[int] = None
    video_per_clip: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 <= min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.factor < 1:
            raise ValueError(f"factor must be positive, got {self.factor}")

    def pixels(self, num_frames: int) -> tuple[int, int]:
        """(min, max) pixels of each frame of a window of ``num_frames`` sampled frames."""
        if num_frames < 1:
            raise ValueError(f"a window needs frames, got {num_frames}")
        low, high = self.min_pixels, self.max_pixels
        if self.total_pixels is not None:
            high = max(min(high, self.total_pixels * FRAME_FACTOR // num_frames), int(low * 1.05))
        share = num_frames if self.video_per_clip else 1
        low = max(low, self.video_min_pixels // share)
        if self.video_max_pixels is not None:
            high = min(high, self.video_max_pixels // share)
        return min(low, high), high

    def frame_size(self, width: int, height: int, num_frames: int) -> Size:
        """(width, height) of the model frames of a ``width`` x ``height`` clip, in a window of ``num_frames``."""
        return resize_to_pixel_bound(width, height, *self.pixels(num_frames), factor=self.factor)


def reference_bounds(variant: str = "qwen2.5") -> FrameBounds:
    """The reference's video bounds for a model family (``qwen``, ``qwen2.5`` or ``qwen3``)."""
    factor = FACTORS[canonical_variant(variant)]
    unit = factor * factor
    return FrameBounds(MIN_FRAME_TOKENS * unit, MAX_FRAME_TOKENS * unit, factor, total_pixels=MAX_VIDEO_TOKENS * unit)


DEFAULT_FRAME_BOUNDS = reference_bounds("qwen2.5")


def _video_config_bounds(config: dict) -> tuple[int, Optional[int]]:
    """(min, max) pixels a video processor config states; 0 and None where it states none."""
    size = config.get("size") or {}
    low = config.get("min_pixels") or size.get("shortest_edge") or 0
    high = config.get("max_pixels") or size.get("longest_edge")
    return int(low), None if high is None else int(high)


@dataclass(frozen=True)
class NemotronFrameSize:
    """The frame size vLLM's Nemotron VL processor resizes every video frame to, from the checkpoint's config.

    Without ``target_num_patches`` (Nemotron Nano 12B v2 VL) every frame becomes a square
    ``image_size`` tile, aspect ratio not kept (512x512: 256 tokens a frame). With it (Nemotron 3
    Nano Omni, 1024) a frame keeps its aspect ratio at about that many ``patch_size`` patches,
    each side an even patch count (pixel shuffle halves both): 640x360 becomes 672x384, 252 tokens
    a 2-frame tubelet. Sizing frames here, in the prepare step, keeps Beam elements small; the
    processor then finds them at their size and resizes nothing.
    """

    image_size: int = 512
    patch_size: int = 16
    downsample_ratio: float = 0.5
    target_num_patches: Optional[int] = None
    maintain_aspect_ratio: bool = True

    def frame_size(self, width: int, height: int, num_frames: int = 1) -> Size:
        """(width, height) of a ``width`` x ``height`` clip's model frames (the frame count does not matter).

        The processor's own size for frames of this size, too (a fixed point): it resizes nothing.
        Its rounding can move a size once more (640x272 gives 768x320, which gives 800x320), so the
        rule is applied until the size stays.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        size = self._target(width, height)
        for _ in range(8):
            again = self._target(*size)
            if again == size:
                break
            size = again
        return size

    def _target(self, width: int, height: int) -> Size:
        """vLLM's ``get_video_target_size_and_feature_size`` size rule (Megatron's video frame resize)."""
        divisor = max(1, int(round(1 / self.downsample_ratio)))
        if self.target_num_patches is None:
            return self.image_size, self.image_size
        if not self.maintain_aspect_ratio:
            side = max(divisor, int(math.sqrt(self.target_num_patches)) // divisor * divisor) * self.patch_size
            return side, side
        aspect = width / height
        rows = max(1, round(math.sqrt(self.target_num_patches / aspect)))
        cols = max(1, round(math.sqrt(self.target_num_patches * aspect)))
        up_rows, up_cols = -(-rows // divisor) * divisor, -(-cols // divisor) * divisor
        if up_rows * up_cols <= self.target_num_patches:
            rows, cols = up_rows, up_cols
        else:
            rows, cols = max(divisor, rows // divisor * divisor), max(divisor, cols // divisor * divisor)
        return cols * self.patch_size, rows * self.patch_size

    def tokens_per_frame(self, width: int, height: int) -> float:
        """Video tokens a frame costs (a tubelet's tokens shared by its frames), before the per-frame text."""
        w, h = self.frame_size(width, height)
        per_group = int(h // self.patch_size * self.downsample_ratio) * int(w // self.patch_size * self.downsample_ratio)
        return per_group / (1 if self.target_num_patches is None else 2)


def nemotron_frame_size(config: Optional[dict]) -> NemotronFrameSize:
    """``NemotronFrameSize`` from a Nemotron checkpoint's ``config.json`` (None: the real checkpoints' values)."""
    config = config or {}
    vision = config.get("vision_config") or {}
    patch = int(config.get("patch_size") or vision.get("patch_size") or 16)
    target = vision.get("video_target_num_patches")
    if target is None and vision.get("video_target_img_size"):
        target = math.ceil(vision["video_target_img_size"] / patch) ** 2
    return NemotronFrameSize(
        image_size=int(config.get("force_image_size") or 512),
        patch_size=patch,
        downsample_ratio=float(config.get("downsample_ratio") or 0.5),
        target_num_patches=None if target is None else int(target),
        maintain_aspect_ratio=bool(vision.get("video_maintain_aspect_ratio", False)),  # vLLM's default
    )


# The real checkpoints' video frame sizing, for when no config can be read.
NEMOTRON_DEFAULTS = {
    "nemotron-vl": NemotronFrameSize(),
    "nemotron-omni": NemotronFrameSize(target_num_patches=1024),
}


def model_frame_bounds(model_dir: Optional[str], variant: str = "qwen2.5") -> Union[FrameBounds, NemotronFrameSize]:
    """How ``variant``'s model frames are sized, read from ``model_dir`` where it says.

    Qwen: the reference's bounds, tightened by ``model_dir``'s video processor config; its image
    processor config (``preprocessor_config.json``) is ignored: its bounds are for images (the real
    Qwen2.5-VL's let 4K frames through unscaled). Nemotron: ``NemotronFrameSize`` from its
    ``config.json`` (the real checkpoints' sizes when the directory has none yet).
    ``model_dir`` is a local folder or a ``gs://`` prefix (read through Beam FileSystems), or None.
    """
    family_spec = caption_model(variant).family
    if family_spec.frames == "nemotron":
        config = FileSystems.join(model_dir, "config.json") if model_dir else None
        if config and FileSystems.exists(config):
            return nemotron_frame_size(read_json(config))
        return NEMOTRON_DEFAULTS[family_spec.name]
    family = family_spec.name
    bounds = reference_bounds(family)
    path = FileSystems.join(model_dir, VIDEO_CONFIG) if model_dir else None
    if not (path and FileSystems.exists(path)):  # a local directory or a gs:// prefix
        return bounds
    low, high = _video_config_bounds(read_json(path))
    return dataclasses.replace(
        bounds, video_min_pixels=low, video_max_pixels=high, video_per_clip=family == "qwen3"
    )
