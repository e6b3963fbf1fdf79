"""Run the benchmark figures and print one table; the JSON goes to ``benchmarks/results/latest.json``.

Usage: ``.venv/bin/python benchmarks/run.py [--only P1,P2,...] [--quick]``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Union

from common import (
    CPU_VLLM_KWARGS,
    GPU_VLLM_KWARGS,
    RESULTS_DIR,
    Figure,
    captioner_dir,
    gpu_name,
    long_clip,
    machine_info,
    sample_clips,
    setup_env,
    short_720p_clip,
    trailer_clip,
)

FIGURES = ("P1", "P10", "P2", "P7", "P9", "P13", "P11", "P12", "P3", "P4", "P4B", "P5", "P6", "P8")


@dataclass(frozen=True)
class Plan:
    """Clip choices and repeat counts of a full or a ``--quick`` run."""

    repeats_cpu: int  # P1
    repeats_reference: int  # P2 (the reference's x264 re-encodes are slow)
    repeats_job: int  # P3
    repeats_captions: int  # P4, P6
    sweep_repeats: int  # P4 batch-size sweep
    caption_windows: int  # P4, P6
    pipeline_windows: int  # P4b
    job_copies: int  # P6: copies of the trailer in the job
    repeats_cores: int  # P7
    repeats_per_window: int  # P10

    @staticmethod
    def make(quick: bool) -> "Plan":
        return Plan(3, 1, 2, 5, 1, 32, 64, 4, 2, 2) if quick else Plan(5, 3, 5, 5, 2, 48, 128, 8, 3, 5)


def _figure_runners(quick: bool) -> dict[str, Callable[[], Union[Figure, list[Figure]]]]:
    """One zero-argument callable per figure (imports stay lazy so ``--only`` skips what it can)."""
    plan = Plan.make(quick)
    kwargs = GPU_VLLM_KWARGS if gpu_name() else CPU_VLLM_KWARGS
    reference_clip = short_720p_clip if quick else trailer_clip

    def p1() -> Figure:
        import p1_prepare_cpu

        return p1_prepare_cpu.run(trailer_clip(), plan.repeats_cpu, None if quick else long_clip())

    def p10() -> list[Figure]:
        import p10_cpu_per_window

        return p10_cpu_per_window.run(plan.repeats_per_window)

    def p2() -> Figure:
        import p2_previews_cpu

        return p2_previews_cpu.run(reference_clip(), plan.repeats_reference)

    def p3() -> Figure:
        import p3_pipeline_overhead

        clips = sample_clips() if quick else [trailer_clip(), *sample_clips()]
        return p3_pipeline_overhead.run(clips, plan.repeats_job, captioner_dir(), kwargs)

    def p4() -> Figure:
        import p4_handler_throughput

        return p4_handler_throughput.run(
            trailer_clip(), plan.caption_windows, plan.repeats_captions, plan.sweep_repeats, captioner_dir(), kwargs
        )

    def p4b() -> Figure:
        import p4b_pipeline_throughput

        # On a GPU a window takes milliseconds: 8x the windows, so that the runs measure throughput, not
        # the pipeline's start (64 windows were under 3 s on the H200).
        windows = plan.pipeline_windows * (8 if gpu_name() else 1)
        return p4b_pipeline_throughput.run(trailer_clip(), windows, plan.repeats_captions, captioner_dir(), kwargs)

    def p5() -> Figure:
        import p5_memory

        long, short = (trailer_clip(), short_720p_clip()) if quick else (long_clip(), trailer_clip())
        return p5_memory.run(long, short, captioner_dir(), kwargs)

    def p7() -> Figure:
        import p7_local_cores

        return p7_local_cores.run(reference_clip(), 8, plan.repeats_cores)

    def p6() -> Figure:
        import p6_gpu

        return p6_gpu.run(trailer_clip(), plan.job_copies, plan.repeats_job, captioner_dir(), kwargs)

    def p8() -> Figure:
        import p8_families

        return p8_families.run(kwargs)

    def p9() -> list[Figure]:
        import p9_compact

        return p9_compact.run(1000 if quick else 10000, plan.repeats_cores)  # P9 (plain Parquet) and P9d (Delta)

    def p13() -> Figure:
        import p13_delta_commit

        return p13_delta_commit.run(1000, plan.repeats_cores)

    def p11() -> list[Figure]:
        import p11_accounting

        # P11 (every clip accounted for) and P11r (every caption on its own window)
        return [p11_accounting.run(200 if quick else 1000), p11_accounting.run_routing(1000 if quick else 10000)]

    def p12() -> list[Figure]:  # P12 (the bound per engine) and P12s (frames lent through shared memory)
        import p12_shared_memory

        return p12_shared_memory.run(windows_per_thread=2 if quick else 6, repeats=1 if quick else 2)

    return {"P1": p1, "P2": p2, "P3": p3, "P4": p4, "P4B": p4b, "P5": p5, "P6": p6, "P7": p7, "P8": p8, "P9": p9,
            "P10": p10, "P13": p13, "P11": p11, "P12": p12}


def _target(figure: Figure) -> str:
    op, bound = figure.target
    return f"{op} {bound:g}" if op else "-"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def format_table(figures: list[Figure]) -> str:
    """The results as a Markdown table, then the P4 batch-size sweep and per-figure notes."""
    lines = [
        "| figure | what | ours | baseline | unit | ratio | target | met? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        if f.skipped:
            lines.append(f"| {f.name} | {f.title} | - | - | {f.unit} | - | {_target(f)} | {f.skipped} |")
            continue
        met = {True: "yes", False: "NO", None: "-"}[f.met]
        lines.append(
            f"| {f.name} | {f.title} | {_num(f.ours)} | {_num(f.baseline)} | {f.unit} | {f.ratio:.2f} "
            f"| {_target(f)} | {met} |"
        )
    for f in figures:
        if f.name == "P10a":
            import p10_cpu_per_window

            lines.append(p10_cpu_per_window.format_clips(f))
        sweep = f.details.get("sweep_windows_per_s")
        if sweep:
            cells = ", ".join(f"{b}: {v['handler']:.2f} vs {v['raw']:.2f}" for b, v in sweep.items())
            lines.append(f"\n{f.name} windows/s by batch size (handler vs raw): {cells}")
        tuned = f.details.get("fixed_mmap_threshold")
        if tuned:
            lines.append(f"\n{f.name} with the engine process's malloc at a fixed 1 MiB mmap threshold: "
                         f"{tuned['ours_mb']:.0f} vs {tuned['baseline_mb']:.0f} MiB, ratio {tuned['ratio']:.2f}; "
                         f"max_held {tuned['max_held']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", help="comma-separated figures, e.g. P1,P4 (default: all)")
    parser.add_argument("--quick", action="store_true", help="shorter clips and fewer repeats (a few minutes)")
    args = parser.parse_args(argv)
    wanted = [name.strip().upper() for name in args.only.split(",")] if args.only else list(FIGURES)
    unknown = sorted(set(wanted) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure(s): {', '.join(unknown)}")

    setup_env()
    runners = _figure_runners(args.quick)
    started = time.time()
    figures: list[Figure] = []
    for name in FIGURES:  # fixed order: the CPU-only figures run before vLLM starts in this process
        if name not in wanted:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            made = runners[name]()
        except Exception as error:  # noqa: BLE001 - one broken figure must not hide the others
            traceback.print_exc()
            made = Figure(name, "failed", "-", ("", 0.0))
            made.skipped = f"error: {type(error).__name__}: {error}"[:200]
        made = made if isinstance(made, list) else [made]  # P10, P9 and P11 give two rows
        wall = round(time.perf_counter() - t0, 1)
        for figure in made:
            figure.details["figure_wall_s"] = wall
        print(f"  {name} done in {wall} s", file=sys.stderr, flush=True)
        figures.extend(made)

    table = format_table(figures)
    print(table)
    report = {
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "figures": [f.to_json() for f in figures],
        "table": table,
    }
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, "latest.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, default=str)
    print(f"\nwrote {os.path.relpath(path)}", file=sys.stderr)
    if "beam_captions.inference.engine" in sys.modules:  # shut vLLM's engine core down cleanly
        sys.modules["beam_captions.inference.engine"].release_engines()
    return 0


if __name__ == "__main__":
    sys.exit(main())
