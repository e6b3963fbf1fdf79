"""P15: what a million captioned windows cost on Dataflow, by layout, from measured parts.

Per window of the synthetic 720p, 1080p and 4K H.264 clips of P10, at the job's defaults (window 256
frames, 2 fps model frames at the reference Qwen2.5-VL bound, previews 1 fps 240p WebP q50 level 6):

- **bytes across each stage boundary**, as Beam encodes them: the coder of each stage's output PCollection
  is read from the real job graph (``build_pipeline``), and the stage's real output is encoded with it:
  the ``ClipRef`` (shared by the clip's windows), the ``WindowRecord`` after ``PrepareWindows`` (model and
  preview frames), after ``GeneratePreviews`` (model frames and WebP) and after captioning (no frames; a
  stand-in 512-token caption);
- **CPU seconds**: P10's two paths (captions only; with previews), one decoder thread, ``RUSAGE_SELF``,
  and the coder's encode and decode of the record that crosses to the GPU workers;
- **GPU seconds** at the published 32,000 windows per GPU-hour (not measured here);
- **codecs at the boundary**: each window's model frames encoded and decoded by candidate codecs
  (single-threaded): bytes, PSNR and largest difference against the frames, CPU seconds. The yardstick
  for "close enough": how far the 1080p clip's own encoding (libx264 CRF 23, 4:2:0) already moved the
  model frames from those of a lossless encode of the same test pattern.

Then ``cost_model.layout_cost`` prices a million windows on Dataflow for three layouts: **right-fitted**
(decode and previews on CPU workers; every window's frames shuffled to the GPU workers), **fused**
(decode and previews on the GPU workers, the machine shape sized by the CPU seconds; only clip references
cross) and **compressed** (right-fitted, with the frames encoded by a codec at the boundary).

Usage: ``.venv/bin/python benchmarks/p15_cost_model.py [--quick] [--prices FILE.json] [--rate N]``; prints
the tables and writes ``benchmarks/results/p15_cost_model.json``. ``--reuse`` prices that file's parts again
(other prices, another rate) without measuring, and writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import subprocess
from typing import Any, Callable

import av
import numpy as np
import pyarrow as pa
from PIL import Image

from common import RESULTS_DIR, SYNTHETIC_CLIPS, CACHE_DIR, captioner_dir, find_ffmpeg, machine_info, self_cpu, synthetic_clip
from cost_model import (
    DECODE_HEADROOM, ENGINE_VCPUS, GPU_SHAPES, PRICES, PUBLISHED_WINDOWS_PER_GPU_HOUR, Crossing, layout_cost,
)
from p10_cpu_per_window import WEBP_OPTIONS, WITH_PREVIEWS, caption_path_cpu, with_previews_cpu

from beam_captions.quality import CaptionCheck
from beam_captions.records import ClipRef, WindowRecord
from beam_captions.transforms.prepare import prepare_clip
from beam_captions.transforms.previews import preview_window

CLIPS = ("720p_h264", "1080p_h264", "4k_h264")
WINDOWS = 1_000_000
DEFAULT_GPU = "nvidia-l4"  # the template's (templates/dataflow/launch.sh ACCELERATOR)
COSTED_CODECS = ("zstd-1", "jpeg-q95-444")  # the exact one and the near-exact one (see the codec table)
STAGES = ("ReadClips", "PrepareWindows", "GeneratePreviews", "CaptionWindows")
CAPTION = ("The camera holds on a busy street as cars pass from left to right under a grey sky. " * 26)[:2048]

# ----------------------------------------------------------------------------------- Beam's coders


def stage_coders() -> dict[str, Any]:
    """The coder Beam gives each stage's output PCollection in the real job graph (previews and captions on)."""
    import apache_beam as beam

    from beam_captions.options import parse_args
    from beam_captions.pipeline import build_pipeline

    config, _ = parse_args(["--input", os.path.join(CACHE_DIR, "clips"), "--output", os.path.join(CACHE_DIR, "p15-out"),
                            "--generate-captions", "--model-dir", captioner_dir(), "--generate-previews"])
    pipeline = beam.Pipeline()
    build_pipeline(pipeline, config)
    proto, context = pipeline.to_runner_api(return_context=True)
    coders = {}
    for transform in proto.components.transforms.values():
        if transform.unique_name in STAGES:
            (output,) = transform.outputs.values()
            coders[transform.unique_name] = context.coders.get_by_id(proto.components.pcollections[output].coder_id)
    return coders


def coder_cpu(coder: Any, element: Any, repeats: int) -> tuple[float, float]:
    """Median CPU seconds of ``coder``'s encode and decode of ``element``."""
    encodes, decodes = [], []
    for _ in range(repeats):
        start = self_cpu()
        data = coder.encode(element)
        middle = self_cpu()
        coder.decode(data)
        encodes.append(middle - start)
        decodes.append(self_cpu() - middle)
    return statistics.median(encodes), statistics.median(decodes)


def captioned(record: WindowRecord) -> WindowRecord:
    """``record`` as the caption stage hands it on (``caption_batch``), with a 512-token stand-in caption."""
    return record.replace(frames=None, caption=CAPTION, caption_check=CaptionCheck(512, "length", ("cut",)),
                          caption_prompt_tokens=6500, caption_model="Qwen/Qwen2.5-VL-7B-Instruct", prompt_variant="default")


# ------------------------------------------------------------------------------------------ codecs


def _pil(fmt: str, **options: Any) -> tuple[Callable, Callable]:
    def encode(frames: np.ndarray) -> list[bytes]:
        out = []
        for frame in frames:
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, fmt, **options)
            out.append(buffer.getvalue())
        return out

    def decode(blobs: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in blobs])

    return encode, decode


def _h264(codec: str, pix_fmt: str, options: dict[str, str]) -> tuple[Callable, Callable]:
    def encode(frames: np.ndarray) -> list[bytes]:
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="h264") as container:
            stream = container.add_stream(codec, rate=2)
            stream.width, stream.height, stream.pix_fmt, stream.options = frames.shape[2], frames.shape[1], pix_fmt, options
            stream.codec_context.thread_count = 1
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        return [buffer.getvalue()]

    def decode(blobs: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
        with av.open(io.BytesIO(blobs[0]), format="h264") as container:
            container.streams.video[0].thread_count = 1
            return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])

    return encode, decode


def _zstd(level: int) -> tuple[Callable, Callable]:
    codec = pa.Codec("zstd", compression_level=level)

    def encode(frames: np.ndarray) -> list[bytes]:
        return [codec.compress(frames.tobytes(), asbytes=True)]

    def decode(blobs: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        return np.frombuffer(codec.decompress(blobs[0], decompressed_size=size, asbytes=True), np.uint8).reshape(shape)

    return encode, decode


CODECS: dict[str, tuple[Callable, Callable]] = {
    "zstd-1": _zstd(1),
    "webp-lossless": _pil("WEBP", lossless=True, quality=0, method=0),
    "x264rgb-lossless": _h264("libx264rgb", "rgb24", {"qp": "0", "preset": "ultrafast"}),
    "jpeg-q95-444": _pil("JPEG", quality=95, subsampling=0),
    "jpeg-q90-420": _pil("JPEG", quality=90),
    "webp-q95": _pil("WEBP", quality=95, method=0),
    "x264-crf18-444": _h264("libx264", "yuv444p", {"crf": "18", "preset": "veryfast"}),
    "x264-crf18-420": _h264("libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}),
}


def closeness(frames: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """PSNR (dB; inf when equal), largest and mean absolute difference of two uint8 frame stacks."""
    diff = frames.astype(np.int16) - other.astype(np.int16)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {"psnr_db": float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse),
            "max_abs_diff": int(np.abs(diff).max()), "mean_abs_diff": float(np.abs(diff).mean())}


def measure_codec(name: str, frames: np.ndarray, coder: Any, record: WindowRecord) -> dict[str, Any]:
    """One codec on one window: bytes, closeness, CPU to encode and decode, and Beam's coder on the result."""
    encode, decode = CODECS[name]
    start = self_cpu()
    blobs = encode(frames)
    middle = self_cpu()
    back = decode(blobs, frames.shape)
    end = self_cpu()
    if back.shape != frames.shape:
        raise RuntimeError(f"{name} gave back {back.shape}, not {frames.shape}")
    crossing = (record.replace(frames=None), blobs)  # what would cross: the record without frames, and the codec's bytes
    coder_encode, coder_decode = coder_cpu(coder, crossing, 1)
    return {"bytes": sum(map(len, blobs)), "crossing_bytes": len(coder.encode(crossing)), "encode_cpu_s": middle - start,
            "decode_cpu_s": end - middle, "coder_encode_cpu_s": coder_encode, "coder_decode_cpu_s": coder_decode,
            **closeness(frames, back)}


def source_error_1080p() -> dict[str, Any]:
    """How far the 1080p clip's own encoding (libx264 CRF 23, 4:2:0) moved its first window's model frames
    from those of a lossless RGB encode of the same 256 test-pattern frames (the window is frames 0-255
    in both, so it samples the same frames)."""
    ffmpeg = find_ffmpeg()
    if not ffmpeg:
        return {"skipped": "no ffmpeg CLI"}
    size, _, source, _ = SYNTHETIC_CLIPS["1080p_h264"]
    reference = os.path.join(CACHE_DIR, "clips", "lossless_1080p_256_frames.mkv")
    if not os.path.exists(reference):
        subprocess.run([ffmpeg, "-nostdin", "-y", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
                        "-i", f"{source}=size={size}:rate=30", "-frames:v", "256", "-c:v", "libx264rgb", "-qp", "0",
                        "-preset", "ultrafast", "-pix_fmt", "rgb24", reference + ".part.mkv"], check=True)
        os.replace(reference + ".part.mkv", reference)
    first = [next(e for e in prepare_clip(ClipRef.from_source(clip), WITH_PREVIEWS) if isinstance(e, WindowRecord))
             for clip in (reference, synthetic_clip("1080p_h264"))]
    if first[0].frame_indices != first[1].frame_indices:
        raise RuntimeError("the lossless reference sampled other frames than the clip")
    return closeness(first[0].frames, first[1].frames)


# ------------------------------------------------------------------------------------- per clip


def measure_clip(name: str, coders: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Bytes per boundary, coder and codec costs per window (averaged over the clip's windows), CPU per window."""
    clip = synthetic_clip(name)
    ref = ClipRef.from_source(clip)
    boundary = {stage: [] for stage in STAGES[1:]}
    frames_bytes, coder_s, codecs, shapes = [], [], {codec: [] for codec in CODECS}, []
    for element in prepare_clip(ref, WITH_PREVIEWS):
        if not isinstance(element, WindowRecord):
            continue
        (previewed,) = preview_window(element, **WEBP_OPTIONS)
        done = captioned(previewed)
        for stage, record in zip(STAGES[1:], (element, previewed, done)):
            boundary[stage].append(len(coders[stage].encode(record)))
        crossing_coder = coders["GeneratePreviews"]
        frames_bytes.append(len(crossing_coder.encode(previewed)) - len(crossing_coder.encode(previewed.replace(frames=None))))
        coder_s.append(coder_cpu(crossing_coder, previewed, max(repeats, 3)))
        shapes.append(list(element.frames.shape))
        for codec in CODECS:
            codecs[codec].append(measure_codec(codec, previewed.frames, crossing_coder, previewed))
    windows = len(shapes)
    runs = {"captions": [caption_path_cpu(clip)[0] for _ in range(repeats)],
            "previews": [with_previews_cpu(clip)[0] for _ in range(repeats)]}
    return {
        "clip": clip,
        "windows": windows,
        "model_frames": shapes,
        "bytes_per_window": {"ClipRef": len(coders["ReadClips"].encode(ref)) / windows,
                             **{stage: statistics.fmean(sizes) for stage, sizes in boundary.items()}},
        "frames_bytes_per_window": statistics.fmean(frames_bytes),
        "coder_cpu_s_per_window": {"encode": statistics.fmean(s[0] for s in coder_s),
                                   "decode": statistics.fmean(s[1] for s in coder_s)},
        "cpu_s": runs,
        "cpu_s_per_window": {key: statistics.median(values) / windows for key, values in runs.items()},
        "codecs": {codec: {key: statistics.fmean(m[key] for m in found) for key in found[0]}
                   for codec, found in codecs.items()},
    }


def crossings(part: dict[str, Any]) -> dict[str, Crossing]:
    """Each layout's per-window CPU seconds (CPU workers, GPU worker) and shuffled bytes, from ``part``."""
    size = part["bytes_per_window"]
    decode_s = DECODE_HEADROOM * part["cpu_s_per_window"]["previews"]
    coder = part["coder_cpu_s_per_window"]
    both = size["ClipRef"] + size["CaptionWindows"]  # listing's shuffle and the writes' keyed fallback, any layout
    layouts = {
        "right-fitted": Crossing(decode_s + coder["encode"], coder["decode"], both + size["GeneratePreviews"]),
        "fused": Crossing(0.0, decode_s, both),
    }
    for name in COSTED_CODECS:
        c = part["codecs"][name]
        layouts[f"compressed ({name})"] = Crossing(decode_s + c["encode_cpu_s"] + c["coder_encode_cpu_s"],
                                                   c["decode_cpu_s"] + c["coder_decode_cpu_s"], both + c["crossing_bytes"])
    return layouts


def costs(parts: dict[str, dict[str, Any]], prices: dict[str, Any], rate: float) -> dict[str, Any]:
    """Every clip x GPU type x layout, batch and streaming, for ``WINDOWS`` windows at ``rate`` windows per GPU-hour."""
    out: dict[str, Any] = {}
    for clip, part in parts.items():
        for layout, crossing in crossings(part).items():
            for gpu in GPU_SHAPES:
                out.setdefault(clip, {}).setdefault(gpu, {})[layout] = {
                    "crossing": vars(crossing),
                    "batch": layout_cost(crossing, gpu, WINDOWS, prices, rate),
                    "streaming": layout_cost(crossing, gpu, WINDOWS, prices, rate, streaming=True),
                }
    return out


# ------------------------------------------------------------------------------------------ tables


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f}" if value >= 1e4 else f"{value / 1e6:.4f}"


def parts_table(parts: dict[str, dict[str, Any]], rate: float) -> str:
    gpu_s = 3600 / rate
    lines = ["| clip | windows | model frames | ClipRef MB | after PrepareWindows MB | after previews MB | after captions MB "
             f"| CPU s (captions only) | CPU s (with previews) | coder encode+decode CPU s | GPU s (at {rate:,.0f}/GPU-hour) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for clip, p in parts.items():
        b, c = p["bytes_per_window"], p["cpu_s_per_window"]
        frames = ", ".join(f"{t}x{h}x{w}" for t, h, w, _ in p["model_frames"])
        coder = p["coder_cpu_s_per_window"]
        lines.append(f"| {clip} | {p['windows']} | {frames} | {_mb(b['ClipRef'])} | {_mb(b['PrepareWindows'])} | "
                     f"{_mb(b['GeneratePreviews'])} | {_mb(b['CaptionWindows'])} | {c['captions']:.2f} | {c['previews']:.2f} | "
                     f"{coder['encode'] + coder['decode']:.3f} | {gpu_s:.4f} |")
    return "\n".join(lines)


def codec_table(parts: dict[str, dict[str, Any]], source: dict[str, Any]) -> str:
    lines = ["| codec | clip | MB per window | smaller by | PSNR dB | max abs diff | encode CPU s | decode CPU s |",
             "|---|---|---|---|---|---|---|---|"]
    for codec in CODECS:
        for clip, p in parts.items():
            c = p["codecs"][codec]
            lines.append(f"| {codec} | {clip} | {c['bytes'] / 1e6:.2f} | {p['frames_bytes_per_window'] / c['bytes']:.1f}x | "
                         f"{c['psnr_db']:.1f} | {c['max_abs_diff']:.0f} | {c['encode_cpu_s']:.3f} | {c['decode_cpu_s']:.3f} |")
    if "psnr_db" in source:
        lines.append(f"| (the clip's own encoding, CRF 23 4:2:0, vs lossless) | 1080p_h264 | - | - | {source['psnr_db']:.1f} "
                     f"| {source['max_abs_diff']} | - | - |")
    return "\n".join(lines)


def layout_table(result: dict[str, Any], gpu: str) -> str:
    lines = [f"| clip | layout | GPU worker ({gpu}) | GPU busy | GPU-hours | GPU workers $ | CPU workers $ | shuffled TB "
             "| Shuffle $ | total $ (batch) | total $ (streaming) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for clip, by_gpu in result.items():
        for layout, r in by_gpu[gpu].items():
            b, s = r["batch"], r["streaming"]
            lines.append(f"| {clip} | {layout} | {b['gpu_worker']['shape']} | {b['gpu_worker']['gpu_busy']:.0%} | "
                         f"{b['gpu_hours']:.1f} | {b['usd']['gpu_workers']:.0f} | {b['usd']['cpu_workers']:.0f} | "
                         f"{b['shuffled_gb'] * 2**30 / 1e12:.2f} | {b['usd']['shuffle']:.0f} | **{b['usd_total']:.0f}** | "
                         f"{s['usd_total']:.0f} |")
    return "\n".join(lines)


def gpu_table(result: dict[str, Any]) -> str:
    layouts = list(next(iter(next(iter(result.values())).values())))
    lines = ["| GPU | clip | " + " | ".join(layouts) + " | cheapest |", "|---" * (len(layouts) + 3) + "|"]
    for gpu in GPU_SHAPES:
        for clip, by_gpu in result.items():
            totals = {layout: by_gpu[gpu][layout]["batch"]["usd_total"] for layout in layouts}
            lines.append(f"| {gpu} | {clip} | " + " | ".join(f"{totals[x]:.0f}" for x in layouts)
                         + f" | {min(totals, key=totals.get)} |")
    return "\n".join(lines)


def measure(repeats: int) -> dict[str, Any]:
    """Every measured part: Beam's coders, each clip's parts, the 1080p clip's own encoding error."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    coders = stage_coders()
    return {"started": started, "repeats": repeats, "coders": {stage: str(coder) for stage, coder in coders.items()},
            "parts": {name: measure_clip(name, coders, repeats) for name in CLIPS},
            "source_error_1080p": source_error_1080p()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat of the CPU measurements (default 3)")
    parser.add_argument("--prices", help="JSON object replacing entries of cost_model.PRICES")
    parser.add_argument("--reuse", action="store_true",
                        help="price the parts the last run measured (its JSON) again, print the tables and write nothing")
    parser.add_argument("--rate", type=float, default=PUBLISHED_WINDOWS_PER_GPU_HOUR,
                        help="windows per GPU-hour (default: the published 32,000, for every GPU type)")
    args = parser.parse_args()
    prices = dict(PRICES)
    if args.prices:
        with open(args.prices, encoding="utf-8") as handle:
            prices.update(json.load(handle))
    path = os.path.join(RESULTS_DIR, "p15_cost_model.json")
    if args.reuse:
        with open(path, encoding="utf-8") as handle:
            measured = json.load(handle)
    else:
        measured = measure(1 if args.quick else 3)
    parts = measured["parts"]
    result = costs(parts, prices, args.rate)
    tables = {
        "parts": parts_table(parts, args.rate),
        "codecs": codec_table(parts, measured["source_error_1080p"]),
        f"layouts_{DEFAULT_GPU}": layout_table(result, DEFAULT_GPU),
        "by_gpu_batch": gpu_table(result),
    }
    for title, table in tables.items():
        print(f"\n{title}:\n{table}")
    shown = {key: value for key, value in prices.items() if key not in ("as_of", "region")}
    print(f"\nprices ({prices['as_of']}, {prices['region']}): {json.dumps(shown)}")
    if args.reuse:
        return
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({**measured, "windows": WINDOWS, "windows_per_gpu_hour": args.rate, "engine_vcpus": ENGINE_VCPUS,
                   "decode_headroom": DECODE_HEADROOM, "prices": prices, "costs": result, "tables": tables,
                   "machine": machine_info()}, handle, indent=1, default=str)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
