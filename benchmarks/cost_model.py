"""P15's arithmetic: what N captioned windows cost on Dataflow, per layout, from per-window measurements.

Nothing here measures: ``p15_cost_model.py`` measures the parts (bytes across each stage boundary, CPU
seconds, codec costs) and hands them to ``layout_cost``. Prices are list prices as recalled (see
``PRICES["as_of"]``); ``--prices FILE`` in ``p15_cost_model.py`` replaces any of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

# List prices, us-central1 (Iowa), on demand, USD. Recalled, not read from the pricing pages: the machine
# that made these tables has no internet. Check https://cloud.google.com/dataflow/pricing before relying on
# them. GB = 2**30 bytes, as Google bills.
PRICES: dict[str, Any] = {
    "as_of": "2025-01, recalled (not checked online)",
    "region": "us-central1",
    "batch_vcpu_hour": 0.056,  # Dataflow batch worker vCPU
    "streaming_vcpu_hour": 0.069,  # Dataflow streaming worker vCPU
    "memory_gb_hour": 0.003557,  # Dataflow worker memory, batch and streaming
    "shuffle_gb": 0.011,  # Dataflow Shuffle data processed (batch)
    # per job: the first 250 GB at 25 % of the price, the next 4,870 GB at 50 %, the rest in full
    "shuffle_tiers": [[250, 0.25], [4870, 0.5], [None, 1.0]],
    "streaming_engine_gb": 0.018,  # Streaming Engine data processed (streaming)
    # GPU-hour: Compute Engine's on-demand GPU prices (Dataflow bills GPUs per GPU-hour on top of the
    # worker's vCPUs and memory; its GPU rates may differ). H100: the least sure (Compute Engine sells it
    # only inside A3 machines; this is about a3-highgpu-8g's price per GPU).
    "gpu_hour": {"nvidia-tesla-t4": 0.35, "nvidia-l4": 0.56, "nvidia-tesla-a100": 2.93, "nvidia-h100-80gb": 11.06},
}

# Published rate (benchmarks/README.md, "CPU cores per GPU"): Qwen3-VL-8B on vLLM, RTX PRO 6000, 1M captions.
PUBLISHED_WINDOWS_PER_GPU_HOUR = 32_000
# vCPUs a GPU worker keeps for the engine (vLLM's engine core and input processing) and Beam: not for decoding.
ENGINE_VCPUS = 4
# Beam's own cost on top of the decode pass (P3: about 10 %), on whichever workers decode.
DECODE_HEADROOM = 1.1


@dataclass(frozen=True)
class Shape:
    """A worker machine type with one GPU (or none)."""

    name: str
    vcpus: int
    memory_gb: float


# One-GPU machine types Dataflow can give each GPU (Dataflow accelerator name -> shapes, smallest first).
GPU_SHAPES: dict[str, tuple[Shape, ...]] = {
    "nvidia-tesla-t4": tuple(Shape(f"n1-standard-{n}", n, 3.75 * n) for n in (4, 8, 16, 32)),
    "nvidia-l4": tuple(Shape(f"g2-standard-{n}", n, 4 * n) for n in (4, 8, 12, 16, 32)),
    "nvidia-tesla-a100": (Shape("a2-highgpu-1g", 12, 85),),
    "nvidia-h100-80gb": (Shape("a3-highgpu-1g", 26, 234),),
}
CPU_WORKER_GB_PER_VCPU = 3.75  # n1-standard: the CPU workers that decode in the right-fitted layout


@dataclass(frozen=True)
class Crossing:
    """What one window costs in a layout: CPU seconds on CPU workers and on the GPU worker, bytes shuffled."""

    cpu_worker_s: float
    gpu_worker_cpu_s: float
    shuffled_bytes: float


def shuffle_cost(gb: float, prices: dict[str, Any]) -> float:
    """Dataflow Shuffle's price of ``gb`` processed in one batch job, volume tiers applied."""
    left, cost = gb, 0.0
    for size, share in prices["shuffle_tiers"]:
        part = left if size is None else min(left, size)
        cost += part * prices["shuffle_gb"] * share
        left -= part
        if left <= 0:
            break
    return cost


def gpu_worker(gpu: str, cpu_s: float, rate_per_hour: float, prices: dict[str, Any], vcpu_hour: float) -> dict:
    """The cheapest one-GPU shape for windows that need ``cpu_s`` CPU seconds each on the GPU worker: its
    windows/s are the GPU's rate unless its vCPUs (less ``ENGINE_VCPUS``) cannot keep up."""
    wanted = rate_per_hour / 3600
    best: Optional[dict] = None
    for shape in GPU_SHAPES[gpu]:
        spare = shape.vcpus - ENGINE_VCPUS
        served = wanted if cpu_s <= 0 else min(wanted, spare / cpu_s)
        if served <= 0:
            continue  # no vCPU to spare for this work
        hourly = prices["gpu_hour"][gpu] + shape.vcpus * vcpu_hour + shape.memory_gb * prices["memory_gb_hour"]
        per_window = hourly / 3600 / served
        if best is None or per_window < best["usd_per_window"]:
            best = {"shape": shape.name, "vcpus": shape.vcpus, "memory_gb": shape.memory_gb, "usd_per_hour": hourly,
                    "windows_per_s": served, "gpu_busy": served / wanted, "usd_per_window": per_window}
    if best is None:
        raise ValueError(f"no {gpu} machine shape has more than {ENGINE_VCPUS} vCPUs")
    return best


def layout_cost(crossing: Crossing, gpu: str, windows: float, prices: dict[str, Any] = PRICES,
                rate_per_hour: float = PUBLISHED_WINDOWS_PER_GPU_HOUR, streaming: bool = False) -> dict:
    """Dollars for ``windows`` windows whose per-window costs are ``crossing``, on GPU type ``gpu``."""
    vcpu_hour = prices["streaming_vcpu_hour" if streaming else "batch_vcpu_hour"]
    machine = gpu_worker(gpu, crossing.gpu_worker_cpu_s, rate_per_hour, prices, vcpu_hour)
    gpu_hours = windows / machine["windows_per_s"] / 3600
    cpu_vcpu_hours = windows * crossing.cpu_worker_s / 3600
    gb = windows * crossing.shuffled_bytes / 2**30
    usd = {
        "gpu_workers": gpu_hours * machine["usd_per_hour"],
        "cpu_workers": cpu_vcpu_hours * (vcpu_hour + CPU_WORKER_GB_PER_VCPU * prices["memory_gb_hour"]),
        "shuffle": gb * prices["streaming_engine_gb"] if streaming else shuffle_cost(gb, prices),
    }
    return {
        "gpu_worker": machine,
        "gpu_hours": gpu_hours,
        "cpu_worker_vcpu_hours": cpu_vcpu_hours,
        "shuffled_gb": gb,
        "usd": usd,
        "usd_total": math.fsum(usd.values()),
    }
