"""Wire the stages into a job: ReadClips | PrepareWindows | GeneratePreviews | CaptionWindows | EnhanceCaptions | WriteOutputs."""

from __future__ import annotations

from typing import Optional

import apache_beam as beam

from beam_captions.inference.gpu_budget import memory_shares
from beam_captions.local import is_local_runner
from beam_captions.io.paths import absolute_location
from beam_captions.media.decode import PreviewSpec
from beam_captions.options import JobConfig
from beam_captions.transforms.prepare import PrepareWindows
from beam_captions.transforms.previews import GeneratePreviews
from beam_captions.transforms.notifications import ClipsFromNotifications
from beam_captions.transforms.read import ReadClips, WatchClips
from beam_captions.transforms.skip_finished import SkipFinishedClips
from beam_captions.transforms.write import WriteOutputs

__all__ = ["asked_outputs", "build_pipeline", "decode_accelerator"]


def asked_outputs(config: JobConfig) -> dict:
    """What this run makes for each clip, and with what (models, prompts, settings): a clip's metas
    records it as ``outputs``, and ``--skip-existing`` skips a clip only if it has all of it."""
    windows = {"window_size": config.captioning_window_size,
               "remainder_threshold": config.captioning_remainder_threshold}
    asked: dict = {}
    if config.generate_previews:
        asked["previews"] = {**windows, "fps": config.preview_target_fps, "height": config.preview_target_height,
                             "quality": config.preview_quality, "compression_level": config.preview_compression_level}
    if config.generate_captions:
        asked["captions"] = {**windows, "model": config.model_dir, "algorithm": config.captioning_algorithm,
                             "prompt_variant": config.captioning_prompt_variant,
                             "prompt_text": config.captioning_prompt_text,
                             "sampling_fps": config.captioning_sampling_fps,
                             "max_output_tokens": config.captioning_max_output_tokens}
        if config.captioning_stage2_caption:
            asked["stage2"] = {"prompt_text": config.captioning_stage2_prompt_text}
        if config.enhance_captions:
            asked["enhancement"] = {"model": config.enhance_captions_model_dir,
                                    "algorithm": config.enhance_captions_algorithm,
                                    "prompt_variant": config.enhance_captions_prompt_variant,
                                    "prompt_text": config.enhance_captions_prompt_text}
    return asked


def decode_accelerator(config: JobConfig) -> Optional[str]:
    """The resource hint of decoding and previews: the model steps' under ``--dataflow-layout fused``, so that
    they run on the GPU workers and only clip references cross to them (README, Dataflow: P15); none otherwise."""
    models = config.generate_captions or config.enhance_captions
    return config.accelerator if models and config.dataflow_layout == "fused" else None


def _hinted(transform: beam.PTransform, accelerator: Optional[str]) -> beam.PTransform:
    return transform.with_resource_hints(accelerator=accelerator) if accelerator else transform


def build_pipeline(pipeline: beam.Pipeline, config: JobConfig, lease_token: Optional[str] = None,
                   delta_commit_in_job: bool = True) -> None:
    """Add the whole caption job described by ``config`` to ``pipeline``. ``lease_token``: the entry of the
    output's lease that the launcher took for this job (a job that runs elsewhere): its workers keep it
    fresh and a batch job gives it back after its last write (``transforms.hold_lease``).
    ``delta_commit_in_job=False``: a Delta output's committer is not a step of the job (the launcher commits)."""
    preview = (
        PreviewSpec(target_fps=config.preview_target_fps, target_height=config.preview_target_height)
        if config.generate_previews
        else None
    )
    asked = asked_outputs(config)
    output = absolute_location(config.output)  # what rows and metas record: never relative to the current folder
    if config.input_subscription:
        clips = pipeline | "ClipsFromNotifications" >> ClipsFromNotifications(config.input_subscription)
    elif config.streaming:
        clips = pipeline | "WatchClips" >> WatchClips(
            config.input[0], config.watch_interval_seconds, config.input_extensions, exclude=output
        )
    else:
        clips = pipeline | "ReadClips" >> ReadClips(config.input, config.input_extensions, exclude=output)
    if lease_token:
        from beam_captions.transforms.hold_lease import KeepLease

        clips = clips | "HoldLease" >> KeepLease(output, lease_token)
    on_gpu = decode_accelerator(config)
    elements = (
        clips
        | "SkipFinished" >> SkipFinishedClips(output, asked, config.skip_existing, config.retry_failed)
        | "PrepareWindows" >> _hinted(PrepareWindows(
            window_size=config.captioning_window_size,
            remainder_threshold=config.captioning_remainder_threshold,
            sampling_fps=config.captioning_sampling_fps,
            model_dir=config.model_dir,
            model_variant=config.captioning_algorithm,
            preview=preview,
            model_frames=config.generate_captions,
            max_frame_pixels=config.max_frame_pixels,
            time_budget_s=config.clip_time_budget_seconds,
            decode_threads=config.decode_threads,
        ), on_gpu)
    )
    if config.generate_previews:
        elements = elements | "GeneratePreviews" >> _hinted(GeneratePreviews(
            quality=config.preview_quality,
            compression_level=config.preview_compression_level,
            num_cpus_per_worker=config.preview_num_cpus_per_worker,
        ), on_gpu)
    # A local run has no bundle retries: an engine that cannot start is tried once, and each window it
    # would have served is recorded as failed (the next run retries those clips).
    local = is_local_runner(pipeline.options.get_all_options()["runner"])
    caption_share, enhance_share = memory_shares(
        config.enhance_captions, config.captioning_gpu_memory_share, config.enhance_captions_gpu_memory_share
    )
    if config.generate_captions:
        from beam_captions.transforms.caption import CaptionWindows  # here: a job without models never loads torch

        elements = elements | "CaptionWindows" >> CaptionWindows(
            model_dir=config.model_dir,
            model_variant=config.captioning_algorithm,
            prompt_variant=config.captioning_prompt_variant,
            prompt_text=config.captioning_prompt_text,
            caption_batch_size=config.captioning_batch_size,
            max_output_tokens=config.captioning_max_output_tokens,
            fp8=config.captioning_use_fp8_weights,
            disable_mmcache=not config.captioning_use_vllm_mmcache,
            generate_stage2_caption=config.captioning_stage2_caption,
            stage2_prompt_text=config.captioning_stage2_prompt_text,
            retry_flagged=config.captioning_retry_flagged,
            video_pruning_rate=config.captioning_video_pruning_rate,
            window_relative_timestamps=config.captioning_window_relative_timestamps,
            performance_mode=config.captioning_performance_mode,
            dtype=config.captioning_dtype,
            frames_dtype=config.captioning_preprocess_dtype,
            trust_remote_code=config.trust_remote_code,
            gpu_memory_utilization=caption_share,
            vllm_kwargs=config.vllm_kwargs,
            accelerator=config.accelerator,
            share_across_processes=config.share_model_across_processes,
            request_timeout_s=config.model_request_timeout_seconds,
            record_start_failures=local,
        )
    if config.enhance_captions:
        from beam_captions.transforms.enhance import EnhanceCaptions

        elements = elements | "EnhanceCaptions" >> EnhanceCaptions(
            model_dir=config.enhance_captions_model_dir,
            model_variant=config.enhance_captions_algorithm,
            prompt_variant=config.enhance_captions_prompt_variant,
            prompt_text=config.enhance_captions_prompt_text,
            batch_size=config.enhance_captions_batch_size,
            max_output_tokens=config.enhance_captions_max_output_tokens,
            fp8=config.enhance_captions_use_fp8_weights,
            gpu_memory_utilization=enhance_share,
            trust_remote_code=config.trust_remote_code,
            vllm_kwargs=config.vllm_kwargs if config.enhance_captions_vllm_kwargs is None else config.enhance_captions_vllm_kwargs,
            accelerator=config.accelerator,
            share_across_processes=config.share_model_across_processes,
            request_timeout_s=config.model_request_timeout_seconds,
            record_start_failures=local,
        )
    written = elements | "WriteOutputs" >> WriteOutputs(
        output,
        window_seconds=config.window_seconds if config.streaming else None,
        asked=asked,
        accelerator=config.accelerator if config.generate_captions or config.enhance_captions else None,
        lateness_horizon_s=config.lateness_horizon_seconds,
        captions_table=config.captions_table,
        delta_commit=delta_commit_in_job,
    )
    if lease_token and not (config.streaming or config.input_subscription):
        from beam_captions.transforms.hold_lease import GiveBackLease

        written | "GiveBackLease" >> GiveBackLease(output, lease_token)
