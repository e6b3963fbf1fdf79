"""Command-line flags of a caption job (the reference's names and defaults) and their validation.

Flags this parser does not know are Beam pipeline options (``--runner`` and so on) and pass through.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from beam_captions.inference.checkpoint_family import caption_mismatch, enhance_mismatch, read_config
from beam_captions.inference.engine import PERFORMANCE_MODES
from beam_captions.inference.gpu_budget import MODEL_SPECS, check_share, gpu_total_gib, memory_shares
from beam_captions.inference.model_source import ModelUnavailableError, check_model_source, pinned_revision
from beam_captions.inference.serving import MAX_IN_FLIGHT
from beam_captions.inference.variants import (
    CAPTION_ALGORITHMS, ENHANCE_ALGORITHMS, ENHANCE_MODELS, caption_model, canonical_variant,
)
from beam_captions.prompts import CAPTION_PROMPTS, ENHANCE_PROMPTS
from beam_captions.extensions import parse_extensions
from beam_captions.limits import MAX_DECODE_THREADS, MAX_ENCODER_THREADS, MAX_LOCAL_WORKERS, MAX_SECONDS

__all__ = ["JobConfig", "build_parser", "parse_args", "ConfigError"]

ALGORITHMS = CAPTION_ALGORITHMS  # qwen, qwen2.5, qwen3, nemotron, nemotron-bf16, nemotron-fp8, ...
ENGINE_DTYPES = ("auto", "float16", "bfloat16", "float32")
FRAME_DTYPES = ("uint8", "float16", "bfloat16", "float32")
WEBP_MAX_SIDE = 16383
CAPTIONS_TABLES = ("parquet", "delta")  # beam_captions.io.delta.TABLE_FORMATS (that module imports Beam)
DATAFLOW_LAYOUTS = ("fused", "right-fitted")  # where --accelerator puts decoding (pipeline.build_pipeline)


class ConfigError(ValueError):
    """A flag value that cannot work; the message is one line."""


@dataclass(frozen=True)
class JobConfig:
    """Everything a caption job needs besides Beam's own options."""

    input: tuple[str, ...]
    output: str
    input_extensions: Optional[frozenset[str]] = None  # None: beam_captions.transforms.read.VIDEO_EXTENSIONS
    streaming: bool = False
    input_subscription: Optional[str] = None
    watch_interval_seconds: float = 10.0
    window_seconds: float = 60.0
    lateness_horizon_seconds: float = 3600.0
    captions_table: str = "parquet"  # or "delta": OUT/captions is a Delta Lake table (io.delta)
    skip_existing: bool = True
    retry_failed: bool = True
    gallery: bool = True
    max_frame_pixels: int = 8192 * 4320
    clip_time_budget_seconds: float = 900.0
    decode_threads: int = 0
    trust_remote_code: bool = False
    local_workers: Optional[int] = None
    log_file: Optional[str] = None
    verbose: bool = False
    force: bool = False  # run even where another live run holds the output's lease
    cancel_on_stop: bool = False  # Ctrl-C / SIGTERM cancel a Dataflow job too (local runs are always cancelled)
    generate_captions: bool = False
    generate_previews: bool = False
    model_dir: Optional[str] = None
    captioning_algorithm: str = "qwen"
    captioning_prompt_variant: str = "default"
    captioning_prompt_text: Optional[str] = None
    captioning_window_size: int = 256
    captioning_remainder_threshold: int = 128
    captioning_sampling_fps: float = 2.0
    captioning_preprocess_dtype: str = "uint8"  # the reference's meaning: dtype the frames are handed over in
    captioning_dtype: str = "auto"  # dtype vLLM computes in (auto: the checkpoint's)
    captioning_batch_size: int = 64
    captioning_max_output_tokens: int = 512
    captioning_use_fp8_weights: bool = False
    captioning_use_vllm_mmcache: bool = False
    captioning_stage2_caption: bool = False
    captioning_stage2_prompt_text: Optional[str] = None
    captioning_retry_flagged: bool = False
    captioning_video_pruning_rate: float = 0.0  # vLLM's video_pruning_rate (EVS); the reference's 0
    captioning_window_relative_timestamps: bool = False  # Qwen3-VL frame times as the reference gives them
    captioning_performance_mode: Optional[str] = None  # vLLM's performance_mode; None: throughput on a GPU
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)
    captioning_gpu_memory_share: Optional[float] = None
    gpu_memory_gib: Optional[float] = None
    enhance_captions: bool = False
    enhance_captions_algorithm: str = "qwen"
    enhance_captions_model_dir: Optional[str] = None
    enhance_captions_prompt_variant: str = "default"
    enhance_captions_prompt_text: Optional[str] = None
    enhance_captions_batch_size: int = 128
    enhance_captions_max_output_tokens: int = 512
    enhance_captions_use_fp8_weights: bool = False
    enhance_captions_gpu_memory_share: Optional[float] = None
    enhance_captions_vllm_kwargs: Optional[dict[str, Any]] = None
    accelerator: Optional[str] = None
    dataflow_layout: str = "fused"  # decoding and previews on the GPU workers too (P15: the cheapest)
    share_model_across_processes: bool = False
    model_request_timeout_seconds: float = 1800.0
    preview_target_fps: float = 1.0
    preview_target_height: int = 240
    preview_compression_level: int = 6
    preview_quality: int = 50
    preview_num_cpus_per_worker: int = 4


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="beam-captions",
        description="Caption video windows with Qwen-VL on vLLM and write WebP previews, as an Apache Beam job. "
        "Unknown flags are Beam pipeline options (--runner, --project, ...). "
        "`beam-captions tiny-models DIR` builds tiny offline test models.",
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", action="extend", default=[],
                    help="video files, folders (all videos under them) or globs; local or gs://; a clip named twice "
                         "is processed once")
    io.add_argument("--input-extensions",
                    help="file extensions a folder scan takes, comma-separated, any case: 'mp4,mov' replaces the "
                         "default set (every container FFmpeg reads: mp4, mov, mkv, mts, m2ts, vob, mxf, dv, y4m, ...), "
                         "'+xyz' adds to it, '*' takes every file; files named explicitly are always taken")
    io.add_argument("--output", required=True, help="output root, local or gs://")
    io.add_argument("--streaming", action="store_true",
                    help="run until cancelled: watch --input for new clips, or read --input-subscription")
    io.add_argument("--input-subscription",
                    help="streaming: Pub/Sub subscription of bucket notifications (projects/P/subscriptions/S)")
    io.add_argument("--watch-interval-seconds", type=float, default=10.0, help="streaming: how often --input is listed")
    io.add_argument("--window-seconds", type=float, default=60.0,
                    help="streaming: Parquet rows are written per event-time window of this length")
    io.add_argument("--lateness-horizon-seconds", type=float, default=3600.0,
                    help="streaming: a window's partition closes this long after the window ends; a clip written "
                         "later goes to the partition of the window it is written in. `beam-captions compact` "
                         "merges closed partitions only, so it never races the job")
    io.add_argument("--captions-table", choices=CAPTIONS_TABLES, default="parquet",
                    help="format of OUT/captions: 'parquet' (default: one Parquet file per clip, merged by "
                         "`beam-captions compact`) or 'delta' (a Delta Lake table: workers stage each clip's rows, "
                         "one committer step commits them in batches; not partitioned by --window-seconds)")

    io.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=True,
                    help="skip clips an earlier run finished: done for the outputs asked (same models and "
                         "prompts) and the source unchanged (size, mtime); on by default")
    io.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=True,
                    help="with --skip-existing, try clips that failed in an earlier run again; on by default")
    io.add_argument("--gallery", action=argparse.BooleanOptionalAction, default=True,
                    help="write the review gallery (OUT/index.html) at the end of a local run; on by default")
    io.add_argument("--max-frame-pixels", type=int, default=8192 * 4320,
                    help="refuse clips whose frames are larger (default 8K: 8192x4320)")
    io.add_argument("--clip-time-budget-seconds", type=float, default=900.0,
                    help="stop decoding a clip after this long and record a failure (default 900)")
    io.add_argument("--decode-threads", type=int, default=0,
                    help="decoder threads per clip: 0 (default) shares this process's cores among the clips it "
                         "decodes at once (all for a clip alone, one each when every core has a clip); 1 spends the "
                         "least CPU per window where many processes decode at once (Dataflow); at most "
                         f"{MAX_DECODE_THREADS}")
    io.add_argument("--trust-remote-code", action="store_true",
                    help="let model directories run their own Python code (off by default)")
    io.add_argument("--local-workers", type=int,
                    help="local (DirectRunner) runs: decode and encode previews on this many threads "
                         f"(default: every core; at most {MAX_LOCAL_WORKERS}), sharing one engine per model")

    io.add_argument("--log-file",
                    help="where the run's log goes (default: OUT/logs/beam-captions-<time>-<pid>.log); "
                         "the terminal shows progress, warnings and the summary")
    io.add_argument("--force", action="store_true",
                    help="run even if another run that is still running holds --output (its OUT/_lease.json): "
                         "without it such a run is refused, as two runs on one output would both make every clip")
    io.add_argument("--verbose", action="store_true",
                    help="also show the libraries' logs (vLLM, transformers, torch, Beam) on the terminal")
    io.add_argument("--cancel-on-stop", action="store_true",
                    help="Ctrl-C or SIGTERM to the launcher also cancels the Dataflow job it submitted (by default "
                         "the launcher stops waiting and the job keeps running, as with Beam; a local run is "
                         "stopped either way)")

    cap = parser.add_argument_group("captions")
    cap.add_argument("--generate-captions", action="store_true", help="caption every window")
    cap.add_argument("--model-dir", help="Hugging Face model directory of the captioner")
    cap.add_argument("--captioning-algorithm", choices=CAPTION_ALGORITHMS, default="qwen",
                     help="qwen (= qwen2.5, Qwen2.5-VL-7B), qwen3 (Qwen3-VL-8B), nemotron (= nemotron-bf16), "
                          "nemotron-fp8, nemotron-nvfp4 (Nemotron Nano 12B v2 VL), nemotron-3-nano-omni (30B-A3B)")
    cap.add_argument("--captioning-prompt-variant", choices=tuple(CAPTION_PROMPTS), default="default")
    cap.add_argument("--captioning-prompt-text", help="custom caption prompt; overrides the variant")
    cap.add_argument("--captioning-window-size", type=int, default=256, help="frames per window (default 256)")
    cap.add_argument("--captioning-remainder-threshold", type=int, default=128,
                     help="a remainder this long becomes its own window (default 128)")
    cap.add_argument("--captioning-sampling-fps", type=float, default=2.0, help="model frames per second (default 2)")
    cap.add_argument("--captioning-preprocess-dtype", choices=FRAME_DTYPES, default="uint8",
                     help="dtype the prepared frames are handed to the model in, as in the reference (default "
                          "uint8; the model's processor normalises them either way)")
    cap.add_argument("--captioning-dtype", choices=ENGINE_DTYPES, default="auto",
                     help="dtype vLLM computes in (default auto: the checkpoint's)")
    cap.add_argument("--captioning-batch-size", type=int, default=64,
                     help="windows in flight to each captioning engine, which batches them continuously "
                          "(default 64; per engine, however many threads and processes feed it; each holds its "
                          f"sampled frames in memory; at most {MAX_IN_FLIGHT})")
    cap.add_argument("--captioning-max-output-tokens", type=int, default=512)
    cap.add_argument("--captioning-use-fp8-weights", action="store_true",
                     help="fp8 weight quantization (Qwen; a Nemotron variant's precision is its checkpoint's)")
    cap.add_argument("--captioning-use-vllm-mmcache", action="store_true", help="keep vLLM's multimodal processor cache on")
    cap.add_argument("--captioning-stage2-caption", action="store_true", help="refine each caption in a second pass")
    cap.add_argument("--captioning-stage2-prompt-text", help="custom stage-2 instruction (the stage-1 caption follows it)")
    cap.add_argument("--captioning-retry-flagged", action="store_true",
                     help="generate again (new seed, stronger repetition penalty) for empty, looping or cut captions")
    cap.add_argument("--captioning-video-pruning-rate", type=float, default=0.0,
                     help="share of each window's video tokens vLLM drops before the language model (EVS, "
                          "video_pruning_rate, in [0, 1); default 0 as in the reference). Trained values: "
                          "Qwen2.5-VL and Qwen3-VL 0 (trained without pruning), Nemotron Nano 12B v2 VL 0.7, "
                          "Nemotron 3 Nano Omni 0.7")
    cap.add_argument("--captioning-window-relative-timestamps", action="store_true",
                     help="Qwen3-VL: frame times from 0 at each window, at the sampling rate (the reference's) "
                          "instead of the clip's times")
    cap.add_argument("--captioning-performance-mode", choices=PERFORMANCE_MODES,
                     help="vLLM's performance_mode for the captioner (default: throughput on a GPU, larger CUDA "
                          "graphs and twice the sequences per step; without a GPU, vLLM's own default, balanced)")
    cap.add_argument("--accelerator", help="resource hint for the GPU steps, e.g. "
                     "'type:nvidia-l4;count:1;install-nvidia-driver' (Dataflow right fitting)")
    cap.add_argument("--dataflow-layout", choices=DATAFLOW_LAYOUTS, default="fused",
                     help="with --accelerator, where decoding and previews run: 'fused' (default: on the GPU workers, "
                          "so only clip references cross to them; give them the vCPUs of the README's CPU cores per "
                          "GPU) or 'right-fitted' (on CPU workers; every window's model frames, about 34 MB, cross "
                          "to the GPU workers through the shuffle)")
    cap.add_argument("--share-model-across-processes", action="store_true",
                     help="one vLLM engine per machine, shared by its SDK processes (Dataflow starts one per vCPU)")
    cap.add_argument("--model-request-timeout-seconds", type=float, default=1800.0,
                     help="longest wait for one window's answer from a model (caption or enhancement); past it the "
                          "engine counts as hung: it is restarted and the window tried once more, then recorded as "
                          "failed (default 1800)")
    cap.add_argument("--vllm-kwargs", default="{}", help='JSON object passed to vllm.LLM(), e.g. \'{"max_model_len": 8192}\'')

    cap.add_argument("--captioning-gpu-memory-share", type=float,
                     help="vLLM gpu_memory_utilization of the captioner (default 0.85 alone, 0.35 beside the enhancer)")
    cap.add_argument("--gpu-memory-gib", type=float,
                     help="GPU memory of the workers, to check before the job that each model fits its share "
                          "(default: this machine's GPU, if any; every worker checks its own GPU before loading)")

    enh = parser.add_argument_group("caption enhancement")
    enh.add_argument("--enhance-captions", action="store_true", help="rewrite each caption with a text LLM")
    enh.add_argument("--enhance-captions-algorithm", choices=ENHANCE_ALGORITHMS, default="qwen", help="qwen (= qwen2.5) or qwen3")
    enh.add_argument("--enhance-captions-model-dir", help="Hugging Face model directory of the text model")
    enh.add_argument("--enhance-captions-prompt-variant", choices=tuple(ENHANCE_PROMPTS), default="default")
    enh.add_argument("--enhance-captions-prompt-text", help="custom enhancement instruction; overrides the variant")
    enh.add_argument("--enhance-captions-batch-size", type=int, default=128,
                     help=f"captions in flight to each enhancement engine (default 128; per engine; at most "
                          f"{MAX_IN_FLIGHT})")
    enh.add_argument("--enhance-captions-max-output-tokens", type=int, default=512)
    enh.add_argument("--enhance-captions-use-fp8-weights", action="store_true")
    enh.add_argument("--enhance-captions-gpu-memory-share", type=float,
                     help="vLLM gpu_memory_utilization of the enhancer (default 0.55)")
    enh.add_argument("--enhance-captions-vllm-kwargs", help="JSON object for the enhancer's vllm.LLM() (default: --vllm-kwargs)")

    pre = parser.add_argument_group("previews")
    pre.add_argument("--generate-previews", action="store_true", help="an animated WebP per window")
    pre.add_argument("--preview-target-fps", type=float, default=1.0)
    pre.add_argument("--preview-target-height", type=int, default=240)
    pre.add_argument("--preview-compression-level", type=int, default=6, help="0 (fast) to 6 (small)")
    pre.add_argument("--preview-quality", type=int, default=50, help="0 to 100")
    pre.add_argument("--preview-num-cpus-per-worker", type=int, default=4,
                     help=f"WebP encoder threads (1 to {MAX_ENCODER_THREADS})")
    return parser


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _vllm_kwargs(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{flag} is not valid JSON ({error.msg} at position {error.pos})") from None
    _check(isinstance(value, dict), f"{flag} must be a JSON object")
    return value


def validate(config: JobConfig) -> None:
    """Raise ``ConfigError`` for the first value that cannot work."""
    _check(all(location.strip() for location in config.input), "--input must not be empty")
    _check(bool(config.output.strip()), "--output must not be empty")
    _check(config.log_file is None or bool(config.log_file.strip()), "--log-file must not be empty")
    _check(bool(config.input) != bool(config.input_subscription), "give --input or --input-subscription (one of them)")
    _check(not config.input_subscription or config.streaming, "--input-subscription needs --streaming")
    _check(not config.streaming or len(config.input) <= 1, "--streaming watches one --input location")
    _check(not config.input_subscription or config.input_subscription.startswith("projects/"),
           "--input-subscription must look like projects/<project>/subscriptions/<name>")
    durations = (("--watch-interval-seconds", config.watch_interval_seconds),
                 ("--window-seconds", config.window_seconds),
                 ("--lateness-horizon-seconds", config.lateness_horizon_seconds),
                 ("--clip-time-budget-seconds", config.clip_time_budget_seconds),
                 ("--model-request-timeout-seconds", config.model_request_timeout_seconds))
    for flag, value in durations + (("--captioning-sampling-fps", config.captioning_sampling_fps),
                                    ("--preview-target-fps", config.preview_target_fps),
                                    ("--captioning-gpu-memory-share", config.captioning_gpu_memory_share),
                                    ("--enhance-captions-gpu-memory-share", config.enhance_captions_gpu_memory_share),
                                    ("--gpu-memory-gib", config.gpu_memory_gib)):
        _check(value is None or math.isfinite(value), f"{flag} must be a finite number, got {value}")
    for flag, value in durations:  # a wait made from one must stay within what this platform can wait
        _check(value <= MAX_SECONDS, f"{flag} must be at most {MAX_SECONDS} (about 3 years), got {value:g}")
    _check(config.watch_interval_seconds > 0, "--watch-interval-seconds must be positive")
    _check(config.window_seconds > 0, "--window-seconds must be positive")
    _check(config.lateness_horizon_seconds >= 0, "--lateness-horizon-seconds must be 0 or more")
    _check(config.max_frame_pixels >= 1, "--max-frame-pixels must be positive")
    _check(config.clip_time_budget_seconds > 0, "--clip-time-budget-seconds must be positive")
    _check(config.decode_threads >= 0, "--decode-threads must be 0 (automatic) or more")
    _check(config.model_request_timeout_seconds > 0, "--model-request-timeout-seconds must be positive")
    _check(config.local_workers is None or config.local_workers >= 1, "--local-workers must be at least 1")
    _check(config.captioning_window_size >= 4, "--captioning-window-size must be at least 4")
    _check(0 <= config.captioning_remainder_threshold <= config.captioning_window_size,
           "--captioning-remainder-threshold must be between 0 and the window size")
    _check(config.captioning_sampling_fps > 0, "--captioning-sampling-fps must be positive")
    _check(config.captioning_batch_size >= 1, "--captioning-batch-size must be at least 1")
    _check(config.captioning_max_output_tokens >= 1, "--captioning-max-output-tokens must be at least 1")
    _check(0 <= config.captioning_video_pruning_rate < 1,
           f"--captioning-video-pruning-rate must be in [0, 1), got {config.captioning_video_pruning_rate:g}")
    _check(config.preview_target_fps > 0, "--preview-target-fps must be positive")
    _check(config.preview_target_height >= 2, "--preview-target-height must be at least 2")
    _check(config.preview_target_height <= WEBP_MAX_SIDE,
           f"--preview-target-height must be at most {WEBP_MAX_SIDE} (the largest side a WebP image can have)")
    _check(0 <= config.preview_compression_level <= 6, "--preview-compression-level must be between 0 and 6")
    _check(0 <= config.preview_quality <= 100, "--preview-quality must be between 0 and 100")
    _check(config.preview_num_cpus_per_worker >= 1, "--preview-num-cpus-per-worker must be at least 1")
    # thread counts (a window in flight waits on a serving thread): each bound is documented where it is defined
    for flag, value, most in (
        ("--decode-threads", config.decode_threads, MAX_DECODE_THREADS),
        ("--local-workers", config.local_workers, MAX_LOCAL_WORKERS),
        ("--preview-num-cpus-per-worker", config.preview_num_cpus_per_worker, MAX_ENCODER_THREADS),
        ("--captioning-batch-size", config.captioning_batch_size, MAX_IN_FLIGHT),
        ("--enhance-captions-batch-size", config.enhance_captions_batch_size, MAX_IN_FLIGHT),
    ):
        _check(value is None or value <= most, f"{flag} must be at most {most}, got {value}")
    captioner = caption_model(config.captioning_algorithm)
    _check(not config.captioning_use_fp8_weights or captioner.fp8_flag,
           f"--captioning-use-fp8-weights does not apply to --captioning-algorithm {config.captioning_algorithm} "
           f"(a Nemotron variant's precision is its checkpoint's): {captioner.fp8_hint}")
    _check(config.gpu_memory_gib is None or config.gpu_memory_gib > 0, "--gpu-memory-gib must be positive")
    if config.generate_captions:
        _check_model_dir("--model-dir", config.model_dir, captioner.hub_id)
        _check_family(caption_mismatch, config.captioning_algorithm, "--model-dir", config.model_dir,
                      config.vllm_kwargs, "--vllm-kwargs")
    if config.enhance_captions:
        _check(config.generate_captions, "--enhance-captions needs --generate-captions")
        _check_model_dir("--enhance-captions-model-dir", config.enhance_captions_model_dir,
                         ENHANCE_MODELS[canonical_variant(config.enhance_captions_algorithm)])
        own_kwargs = config.enhance_captions_vllm_kwargs is not None
        _check_family(enhance_mismatch, config.enhance_captions_algorithm, "--enhance-captions-model-dir",
                      config.enhance_captions_model_dir,
                      config.enhance_captions_vllm_kwargs if own_kwargs else config.vllm_kwargs,
                      "--enhance-captions-vllm-kwargs" if own_kwargs else "--vllm-kwargs")
        _check(config.enhance_captions_batch_size >= 1, "--enhance-captions-batch-size must be at least 1")
        _check(config.enhance_captions_max_output_tokens >= 1, "--enhance-captions-max-output-tokens must be at least 1")
    for flag, share in (("--captioning-gpu-memory-share", config.captioning_gpu_memory_share),
                        ("--enhance-captions-gpu-memory-share", config.enhance_captions_gpu_memory_share)):
        _check(share is None or 0 < share <= 1, f"{flag} must be in (0, 1]")
    try:
        shares = memory_shares(
            config.enhance_captions, config.captioning_gpu_memory_share, config.enhance_captions_gpu_memory_share
        )
        _check_memory(config, captioner.hub_id, shares)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _max_model_len(kwargs: dict[str, Any], default: int) -> int:
    return int(kwargs.get("max_model_len") or default)


def _check_memory(config: JobConfig, caption_hub_id: str, shares: tuple[float, Optional[float]]) -> None:
    """Each model fits its GPU memory share with one full sequence (GPU size: --gpu-memory-gib or this machine's)."""
    if not (config.generate_captions or config.enhance_captions):
        return  # no model: nothing to fit, and no torch to import to ask for the GPU's size
    gpu_gib = config.gpu_memory_gib or gpu_total_gib()
    if gpu_gib is None:
        return  # no GPU here and none named: each worker checks its own GPU before loading
    caption_kwargs = config.vllm_kwargs
    if config.generate_captions and "model" not in caption_kwargs:
        check_share(
            caption_hub_id, gpu_gib, float(caption_kwargs.get("gpu_memory_utilization", shares[0])),
            fp8=config.captioning_use_fp8_weights,
            tokens=_max_model_len(caption_kwargs, caption_model(config.captioning_algorithm).family.max_model_len),
        )
    enhance_kwargs = config.vllm_kwargs if config.enhance_captions_vllm_kwargs is None else config.enhance_captions_vllm_kwargs
    enhancer = ENHANCE_MODELS[canonical_variant(config.enhance_captions_algorithm)]
    if config.enhance_captions and shares[1] is not None and "model" not in enhance_kwargs and enhancer in MODEL_SPECS:
        check_share(
            enhancer, gpu_gib, float(enhance_kwargs.get("gpu_memory_utilization", shares[1])),
            fp8=config.enhance_captions_use_fp8_weights, tokens=_max_model_len(enhance_kwargs, 32768),
            flag="--enhance-captions-gpu-memory-share",
        )


def _check_model_dir(flag: str, model_dir: Optional[str], model_id: str) -> None:
    """The weights can be had before any work starts: local, under a gs:// prefix, or downloaded now from the hub."""
    _check(bool(model_dir), f"{flag} is required")
    try:
        check_model_source(model_dir, model_id=model_id, revision=pinned_revision(model_id))
    except ModelUnavailableError as error:
        raise ConfigError(f"{flag} {error}") from None


def _check_family(mismatch, algorithm: str, flag: str, model_dir: str, kwargs: dict[str, Any], kwargs_flag: str) -> None:
    """The checkpoint vLLM will load is one of ``algorithm``'s family (``checkpoint_family``): its
    ``config.json`` is read when there is one (after ``_check_model_dir``, so a directory just downloaded
    into is read too); a location without one, or a remote one that cannot be read now, is not judged.
    A ``model`` in the engine's vLLM kwargs replaces the model directory, so that one is read instead."""
    if isinstance(kwargs.get("model"), str):
        flag, model_dir = f"{kwargs_flag} model", kwargs["model"]
    try:
        checkpoint = read_config(model_dir)
    except ValueError as error:
        raise ConfigError(f"{flag} {error}") from None
    message = mismatch(checkpoint, algorithm, model_dir, flag) if checkpoint is not None else None
    _check(message is None, message or "")


def _runner_named(beam_args: Sequence[str]) -> Optional[str]:
    """The ``--runner`` among Beam's arguments (None: the default, DirectRunner), read without Beam."""
    runner = None
    for i, arg in enumerate(beam_args):
        if arg == "--runner" and i + 1 < len(beam_args):
            runner = beam_args[i + 1]
        elif arg.startswith("--runner="):
            runner = arg.split("=", 1)[1]
    return runner


def _check_pruning_here(config: JobConfig, beam_args: Sequence[str]) -> None:
    """A local run's engines start here: refuse pruning where this machine's vLLM cannot apply it."""
    rate = config.vllm_kwargs.get("video_pruning_rate", config.captioning_video_pruning_rate)
    if not (config.generate_captions and rate):
        return
    from beam_captions.local import is_local_runner
    from beam_captions.inference.pruning import CPU_PRUNING_GAP, pruning_runs_here
    from beam_captions.logs import held_for_log_file

    with held_for_log_file():  # what importing vLLM logs is for the log file, not the terminal
        runs_here = not is_local_runner(_runner_named(beam_args)) or pruning_runs_here()
    _check(runs_here,
           f"--captioning-video-pruning-rate {rate:g}: {CPU_PRUNING_GAP}; this run's engines start here, "
           "without one (leave the rate at 0, or run on a GPU machine)")


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[JobConfig, list[str]]:
    """The job's config and the remaining (Beam) arguments; exits with a one-line error on bad values."""
    parser = build_parser()
    known, beam_args = parser.parse_known_args(argv)
    values = vars(known)
    try:
        values["vllm_kwargs"] = _vllm_kwargs(values["vllm_kwargs"], "--vllm-kwargs")
        if values["enhance_captions_vllm_kwargs"] is not None:
            values["enhance_captions_vllm_kwargs"] = _vllm_kwargs(
                values["enhance_captions_vllm_kwargs"], "--enhance-captions-vllm-kwargs"
            )
        values["input"] = tuple(values["input"])
        if values["output"].strip():  # paths in rows and metas must not depend on where the run started
            from beam_captions.io.paths import absolute_location  # Beam: not needed to build the parser

            values["output"] = absolute_location(values["output"])
        if values["input_extensions"] is not None:
            try:
                values["input_extensions"] = parse_extensions(values["input_extensions"])
            except ValueError as error:
                raise ConfigError(str(error)) from None
        config = JobConfig(**values)
        validate(config)
        _check_pruning_here(config, beam_args)
    except ConfigError as error:
        parser.error(str(error))
    return config, beam_args


