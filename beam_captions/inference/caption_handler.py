"""A Beam ``ModelHandler`` that captions video windows with a video model on vLLM (Qwen-VL, Nemotron VL).

Example::

    handler = VideoCaptionHandler(model_dir="models/captioner", model_variant="nemotron")
    outcomes = windows | RunInference(handler)   # one WindowRecord per window: captioned, or carrying its Failure

What differs between model families (chat turns, template switches, vLLM settings) comes from the
variant's ``CaptionFamily`` (``beam_captions.inference.variants``); the rest is the same for all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from beam_captions.inference.engine import Engine, EngineSettings
from beam_captions.inference.pruning import check_pruning_rate
from beam_captions.inference.variants import QWEN25, CaptionFamily, caption_model
from beam_captions.inference.vllm_handler import DEFAULT_REQUEST_TIMEOUT_S, VLLMWindowHandler
from beam_captions.prompts import caption_prompt, stage2_prompt
from beam_captions.quality import CaptionCheck, better_caption, check_caption
from beam_captions.records import WindowRecord

__all__ = [
    "CaptionRequest", "Generated", "VideoCaptionHandler", "caption_batch", "generate_checked",
    "source_timing", "stage1_prompt", "strip_reasoning", "video_input", "video_metadata",
]

@dataclass(frozen=True)
class CaptionRequest:
    """What to ask the captioner, and how to sample its answer."""

    prompt: str
    prompt_variant: str = "default"
    window_prompt_first: bool = False  # a window's prompt from preparation (``WindowRecord.prompt``) wins
    stage2_instruction: Optional[str] = None
    generate_stage2: bool = False
    retry_flagged: bool = False
    max_output_tokens: int = 512
    temperature: float = 0.1
    top_p: float = 0.001
    repetition_penalty: float = 1.05
    retry_seed: int = 1
    retry_repetition_penalty: float = 1.3
    family: CaptionFamily = QWEN25
    frames_dtype: str = "uint8"  # the dtype frames are handed to the model in (the reference's preprocess dtype)
    window_relative_timestamps: bool = False  # the reference's frame times (from 0 at each window, nominal rate)

    def sampling_params(self, retry: bool = False) -> Any:
        """The reference's sampling; a retry gets another seed and a stronger repetition penalty."""
        from vllm import SamplingParams

        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.retry_repetition_penalty if retry else self.repetition_penalty,
            max_tokens=self.max_output_tokens,
            seed=self.retry_seed if retry else None,
        )


@dataclass(frozen=True)
class Generated:
    """One generated text, its sanity check and the prompt's token count (video tokens included)."""

    text: str
    check: CaptionCheck
    prompt_tokens: int


RETRY_FLAGS = frozenset({"empty", "repetition", "truncated"})
REASONING_RETRY = frozenset({"reasoning_only"})  # retried for a reasoning family whatever ``retry_flagged`` says


_THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_THINK_TAGS = re.compile(r"</?think>")


def strip_reasoning(text: str) -> str:
    """``text`` without a reasoning model's ``<think>...</think>`` (an unclosed one: cut off mid-thought).

    A ``</think>`` with no opening tag (the chat template opened it in the prompt) drops what precedes it.
    """
    if "</think>" in text and "<think>" not in text.split("</think>", 1)[0]:
        text = text.rsplit("</think>", 1)[1]
    return _THINK_BLOCK.sub("", text)


FRAME_DTYPES = ("uint8", "float16", "bfloat16", "float32")


def frames_as(frames: Any, dtype: str) -> Any:
    """``frames`` (uint8, 0-255) in ``dtype``, values kept: a numpy array, or a torch tensor for bfloat16
    (numpy has none)."""
    if dtype not in FRAME_DTYPES:
        raise ValueError(f"frames dtype must be one of {', '.join(FRAME_DTYPES)}, got {dtype!r}")
    if dtype == "uint8":
        return frames
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(frames).to(torch.bfloat16)
    return frames.astype(dtype)


TIMING_TOLERANCE_FRAMES = 0.01  # a window start further than this from index / rate: not constant-rate timing


def source_timing(record: WindowRecord) -> tuple[float, list]:
    """``(fps, frames_indices)`` whose ratio ``index / fps`` is each sampled frame's time in the clip.

    The rate is the window's own source frame rate (its source frames over its duration, both from the
    frames' presentation times), so it needs no clip-level field. For a constant frame rate that rate is
    the clip's and the window starts at ``start_frame / fps``: the indices are the frames' real source
    indices. For a variable frame rate (the window start is not ``start_frame / fps``), the indices are
    shifted by a fraction so that times are exact at the window start (``start_s``, the first frame's
    presentation time) and run at the window's average rate from there: what ``index / fps`` can say
    without each frame's own timestamp, which the window record does not carry.
    """
    span = record.end_frame - record.start_frame + 1
    duration = record.end_s - record.start_s
    if span < 1 or duration <= 0:
        raise ValueError(f"window {record.window_index} of {record.source} has no duration")
    fps = span / duration
    offset = record.start_s * fps - record.start_frame
    if abs(offset) <= TIMING_TOLERANCE_FRAMES:
        return fps, [int(i) for i in record.frame_indices]
    return fps, [int(i) + offset for i in record.frame_indices]


def video_metadata(record: WindowRecord, num_frames: int, family: CaptionFamily = QWEN25,
                   window_relative_timestamps: bool = False) -> dict:
    """The video metadata vLLM gets with a window's frames (already sampled: ``do_sample_frames`` off).

    The reference's: ``fps`` the sampling rate and ``frames_indices`` ``0..n-1``, so a model that reads
    frame times from them (Qwen3-VL) sees times from 0 at every window. A family with ``timestamps``
    gets the clip's true times instead (``source_timing``), unless ``window_relative_timestamps``.
    """
    duration = max(record.end_s - record.start_s, 1e-3)
    metadata = {
        "total_num_frames": num_frames,
        "fps": num_frames / duration,
        "duration": duration,
        "video_backend": "pyav",
        "frames_indices": list(range(num_frames)),
        "do_sample_frames": False,
    }
    if family.timestamps and not window_relative_timestamps:
        if len(record.frame_indices) != num_frames:
            raise ValueError(f"window {record.window_index} of {record.source} has {num_frames} frames "
                             f"but {len(record.frame_indices)} frame indices")
        fps, indices = source_timing(record)
        metadata.update(fps=fps, frames_indices=indices, total_num_frames=record.end_frame + 1)
    return metadata


def video_input(
    engine: Engine, record: WindowRecord, prompt: str, family: CaptionFamily = QWEN25, frames_dtype: str = "uint8",
    window_relative_timestamps: bool = False,
) -> dict:
    """A vLLM input dict: the prompt rendered by ``family``'s chat, and the window's frames with their metadata.

    The same for every family vLLM knows (Qwen2.5-VL, Qwen3-VL, Nemotron VL): frames ``(T, H, W, 3)``
    already sampled and sized (``do_sample_frames`` off), in ``frames_dtype`` (default uint8), and the
    video's metadata (``video_metadata``: Qwen3-VL's frame times are the clip's unless
    ``window_relative_timestamps``).
    """
    frames = record.frames
    if frames is None or len(frames) < 2:
        raise ValueError(f"window {record.window_index} of {record.source} carries no frames")
    frames = frames_as(frames, frames_dtype)
    metadata = video_metadata(record, len(frames), family, window_relative_timestamps)
    text = engine.render_chat(family.messages(prompt), **dict(family.template_kwargs))
    return {"prompt": text, "multi_modal_data": {"video": (frames, metadata)}}


def generate_checked(engine: Engine, inputs: list[dict], params: Any) -> list[Generated]:
    """Generate one text per input, each with its token count, finish reason, flags and prompt size."""
    results = []
    for output in engine.generate(inputs, params):
        completion = output.outputs[0]
        text = strip_reasoning(completion.text).strip()
        reasoning = not text and bool(_THINK_TAGS.sub("", completion.text).strip())  # all its text was reasoning
        check = check_caption(text, len(completion.token_ids), completion.finish_reason, reasoning)
        results.append(Generated(text, check, len(output.prompt_token_ids)))
    return results


def _retry_flagged(engine: Engine, inputs: list[dict], first: list[Generated], request: CaptionRequest,
                   flags: frozenset[str]) -> list[bool]:
    """Generate again for captions with one of ``flags``; keep the better one (in place)."""
    chosen = [i for i, g in enumerate(first) if flags & set(g.check.flags)]
    if not chosen:
        return [False] * len(first)
    second = generate_checked(engine, [inputs[i] for i in chosen], request.sampling_params(retry=True))
    for i, again in zip(chosen, second):
        if better_caption(first[i].check, again.check):
            first[i] = again
    return [i in chosen for i in range(len(first))]


def stage1_prompt(record: WindowRecord, request: CaptionRequest) -> tuple[str, str]:
    """The stage-1 prompt of ``record`` and its variant's name: the one chosen in preparation, if any, where
    the caption stage was given none of its own; else the caption stage's."""
    if request.window_prompt_first and record.prompt:
        return record.prompt, record.prompt_variant or "custom"
    return request.prompt, request.prompt_variant


def caption_batch(engine: Engine, batch: Sequence[WindowRecord], request: CaptionRequest) -> list[WindowRecord]:
    """Caption every window of ``batch`` (stage 1, retries of flagged captions, stage 2); raises on engine errors."""
    stage1_prompts = [stage1_prompt(r, request) for r in batch]
    inputs = [video_input(engine, r, prompt, request.family, request.frames_dtype, request.window_relative_timestamps)
              for r, (prompt, _) in zip(batch, stage1_prompts)]
    stage1 = generate_checked(engine, inputs, request.sampling_params())
    retry_on = RETRY_FLAGS if request.retry_flagged else REASONING_RETRY if request.family.reasoning else frozenset()
    retried = _retry_flagged(engine, inputs, stage1, request, retry_on)
    stage2: list[Optional[Generated]] = [None] * len(batch)
    if request.generate_stage2:
        wanted = [i for i, g in enumerate(stage1) if g.text]
        prompts = [stage2_prompt(stage1[i].text, request.stage2_instruction) for i in wanted]
        refined = generate_checked(
            engine,
            [video_input(engine, batch[i], p, request.family, request.frames_dtype, request.window_relative_timestamps)
             for i, p in zip(wanted, prompts)],
            request.sampling_params(),
        )
        for i, generated in zip(wanted, refined):
            stage2[i] = generated
    return [
        record.replace(
            frames=None,
            caption=first.text,
            caption_check=first.check,
            caption_stage2=second.text if second else None,
            caption_stage2_check=second.check if second else None,
            caption_retried=again,
            caption_prompt_tokens=first.prompt_tokens,
            caption_model=engine.name,
            prompt_variant=variant,
        )
        for record, first, second, again, (_, variant) in zip(batch, stage1, stage2, retried, stage1_prompts)
    ]


class VideoCaptionHandler(VLLMWindowHandler):
    """Captions ``WindowRecord``s with a video model directory (any ``--captioning-algorithm``) served by vLLM.

    ``model_variant`` picks the family (chat format, vLLM settings) and the hub checkpoint an empty
    ``model_dir`` is filled from. Nemotron variants turn ``trust_remote_code`` on: their checkpoints
    ship their config class as code. ``fp8`` is vLLM's on-the-fly fp8 (Qwen only; a Nemotron
    variant's precision is its checkpoint's). ``prompt_variant`` / ``prompt_text`` (the text wins) pick the
    caption prompt; given neither, a window keeps the prompt chosen in preparation
    (``PrepareWindows(prompt_variant=, prompt_text=)``) and the others get the ``default`` variant's.

    Each window is its own request: a window that fails comes back without a caption and carrying a
    ``Failure`` (stage ``caption``); the others keep their captions. ``caption_batch_size`` is the
    reference's name for the windows in flight to the engine (per engine, whatever the number of
    threads and processes feeding it). ``inference_fn`` replaces the call into the engine. The
    reference's names ``model_batch_size`` and ``preprocess_dtype`` are accepted too, and ``verbose``.

    ``video_pruning_rate`` is vLLM's ``video_pruning_rate`` (EVS: that share of a window's video tokens
    dropped before the language model), passed for every family: the default 0 is the reference's, also
    for the Nemotron checkpoints whose config asks for 0.7. ``window_relative_timestamps`` gives Qwen3-VL
    the reference's frame times (from 0 at each window) instead of the clip's (``video_metadata``).
    ``performance_mode`` is vLLM's (``balanced``, ``interactivity``, ``throughput``); by default
    ``throughput`` on a GPU and vLLM's own default (``balanced``) without one.
    """

    stage = "caption"
    done_counter = "windows_captioned"
    reference_names = frozenset({"model_batch_size", "preprocess_dtype", "verbose"})

    def __init__(
        self,
        model_dir: str,
        *,
        model_variant: str = "qwen2.5",
        prompt_variant: Optional[str] = None,
        prompt_text: Optional[str] = None,
        caption_batch_size: int = 64,
        max_output_tokens: int = 512,
        fp8: bool = False,
        disable_mmcache: bool = True,
        generate_stage2_caption: bool = False,
        stage2_prompt_text: Optional[str] = None,
        retry_flagged: bool = False,
        dtype: str = "auto",
        frames_dtype: str = "uint8",
        max_model_len: Optional[int] = None,
        gpu_memory_utilization: float = 0.85,
        video_pruning_rate: float = 0.0,
        window_relative_timestamps: bool = False,
        performance_mode: Optional[str] = None,
        vllm_kwargs: Optional[dict] = None,
        trust_remote_code: bool = False,
        share_across_processes: bool = False,
        request_timeout_s: Optional[float] = DEFAULT_REQUEST_TIMEOUT_S,
        inference_fn: Callable[[Engine, Sequence[WindowRecord], CaptionRequest], list[WindowRecord]] = caption_batch,
        **reference_names: Any,
    ):
        # The reference's CaptionGenerationStage / CaptionPreparationStage names, where ours differ.
        self.refuse_unknown(reference_names)
        caption_batch_size = reference_names.pop("model_batch_size", caption_batch_size)
        frames_dtype = reference_names.pop("preprocess_dtype", frames_dtype)
        self.verbose = bool(reference_names.pop("verbose", False))
        model = caption_model(model_variant)
        family = model.family
        if fp8 and not model.fp8_flag:
            raise ValueError(f"fp8 weights do not apply to {model.variant}: {model.fp8_hint}")
        check_pruning_rate(video_pruning_rate)
        settings = EngineSettings(
            model_dir=model_dir,
            fp8=fp8,
            disable_mmcache=disable_mmcache,
            dtype=dtype,
            max_model_len=max_model_len if max_model_len is not None else family.max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code or family.trust_remote_code,
            hub_model_id=model.hub_id,
            mm_processor_kwargs=family.mm_processor_kwargs,
            mamba=family.mamba,
            performance_mode=performance_mode,
            extra={"video_pruning_rate": float(video_pruning_rate), **(vllm_kwargs or {})},
        )
        request = CaptionRequest(
            prompt=caption_prompt(prompt_variant or "default", prompt_text),
            prompt_variant="custom" if prompt_text else prompt_variant or "default",
            window_prompt_first=prompt_variant is None and prompt_text is None,
            stage2_instruction=stage2_prompt_text,
            generate_stage2=generate_stage2_caption,
            retry_flagged=retry_flagged,
            max_output_tokens=max_output_tokens,
            family=family,
            frames_dtype=frames_dtype,
            window_relative_timestamps=window_relative_timestamps,
        )
        if frames_dtype not in FRAME_DTYPES:
            raise ValueError(f"frames_dtype must be one of {', '.join(FRAME_DTYPES)}, got {frames_dtype!r}")
        super().__init__(
            settings, request, inference_fn, batch_size=caption_batch_size,
            share_across_processes=share_across_processes, request_timeout_s=request_timeout_s,
        )

    @property
    def generate_calls(self) -> int:
        """Stage 1, then a retry of a flagged caption (asked, or a reasoning family's answer that was all
        reasoning) and stage 2 where asked (``caption_batch``)."""
        request = self.request
        return 1 + int(request.retry_flagged or request.family.reasoning) + int(request.generate_stage2)

    def wants(self, element: object) -> bool:
        return isinstance(element, WindowRecord) and element.frames is not None

    def on_failure(self, record: WindowRecord) -> WindowRecord:
        return record.replace(frames=None, caption_model=self.model_name)

    def check(self, record: WindowRecord) -> Optional[Exception]:
        if record.caption:
            return None
        if record.caption_check and "reasoning_only" in record.caption_check.flags:
            tries = "twice (retried once)" if record.caption_retried else "once"
            return ValueError(f"the model wrote reasoning and no caption, {tries}")
        return ValueError("the model returned an empty caption")

    def get_num_bytes(self, batch: Sequence[WindowRecord]) -> int:
        return sum(r.frames.nbytes for r in batch if isinstance(r, WindowRecord) and r.frames is not None)
