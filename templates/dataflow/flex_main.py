"""Flex Template entry point (``FLEX_TEMPLATE_PYTHON_PY_FILE``): template parameters -> ``beam-captions`` flags.

The launcher runs ``python flex_main.py --input=gs://... --generate_captions=true --runner=DataflowRunner
--project=... --region=... --staging_location=... --temp_location=... [--sdk_container_image=...]``: every
template parameter of ``metadata.json`` arrives as ``--<dest>=<value>`` and a switch as ``true``/``false``.
This turns them back into the CLI's own flags (``--generate-captions``, ``--model-dir=...``), leaves
Beam's options as they are, adds ``--sdk_location=container`` (the worker image already holds this Beam
SDK, so nothing is staged) unless given, and runs the job exactly as ``beam-captions`` would.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["to_cli_args", "main"]


def to_cli_args(argv: Sequence[str], parser: Optional[argparse.ArgumentParser] = None) -> list[str]:
    """The ``beam-captions`` command line for the launcher's ``argv``."""
    if parser is None:
        from beam_captions.options import build_parser

        parser = build_parser()
    flags = {action.dest: action for action in parser._actions if action.option_strings}
    args: list[str] = []
    for arg in argv:
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        action = flags.get(name.replace("-", "_")) if sep else None
        if action is None or isinstance(action, argparse._HelpAction):
            args.append(arg)  # a Beam option (or an already CLI-shaped flag)
        elif isinstance(action, argparse._StoreTrueAction):
            if value.strip().lower() not in ("true", "false"):
                raise SystemExit(f"beam-captions: error: --{name} takes true or false, not {value!r}")
            if value.strip().lower() == "true":
                args.append(action.option_strings[0])
        else:
            args.append(f"{action.option_strings[0]}={value}")  # one token: a value may start with '-'
    if not any(a == "--sdk_location" or a.startswith("--sdk_location=") for a in args):
        args.append("--sdk_location=container")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    from beam_captions.cli import main as cli_main

    return cli_main(to_cli_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
