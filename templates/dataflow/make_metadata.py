"""Write the Flex Template's ``metadata.json`` from the CLI's own parser, so the two cannot drift.

    python templates/dataflow/make_metadata.py           # rewrite metadata.json next to this file
    python templates/dataflow/make_metadata.py --check   # exit 1 when metadata.json is out of date

Every flag of ``beam_captions.options.build_parser()`` becomes one template parameter:

* the name is the flag's ``dest`` (``--model-dir`` -> ``model_dir``): Flex Template parameter names are
  identifiers, and the launcher passes each one back as ``--model_dir=VALUE``; ``flex_main.py`` turns
  that into the CLI's ``--model-dir=VALUE`` again;
* a switch (``--generate-captions``, or ``--skip-existing/--no-skip-existing``) becomes a BOOLEAN
  parameter taking ``true`` or ``false``;
* a flag with choices becomes an ENUM, an int or float flag a NUMBER, each with a validation regex;
* ``helpText`` is the flag's help, or (for the few flags without one) a sentence made from its
  default and choices, since Dataflow requires a help text for every parameter.

Beam's own options (``sdk_container_image``, ``experiments``, ...) are not template parameters: pass
them with ``gcloud dataflow flex-template run --parameters`` / ``--additional-experiments``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
METADATA_PATH = os.path.join(HERE, "metadata.json")
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # run from a checkout without installing

from beam_captions.options import build_parser  # noqa: E402

__all__ = ["cli_flags", "parameter_for", "build_metadata", "render", "METADATA_PATH"]

TEMPLATE_NAME = "beam-captions"
TEMPLATE_DESCRIPTION = (
    "Caption video windows with Qwen-VL on vLLM and write WebP previews (Apache Beam). Decoding, previews "
    "and writing run on CPU workers; only the caption steps ask for GPUs (see the accelerator parameter)."
)

# Validation of free-form values, by parameter name (the CLI validates the rest of each value itself).
NAMED_REGEXES = {
    # Dataflow workers read and write Cloud Storage; a local path would only exist on the launcher.
    "input": r"^gs://[^/]+/.*$",
    "output": r"^gs://[^/]+/.*$",
    "input_subscription": r"^projects/[^/]+/subscriptions/[^/]+$",
    # A Beam resource hint value: type:GPU;count:N[;machine_type:...][;install-nvidia-driver[:VERSION]]
    "accelerator": r"^type:[a-z0-9-]+;count:[1-9][0-9]*(;[a-z_-]+(:[A-Za-z0-9._-]+)?)*$",
}
# A gs:// prefix (copied once per worker machine) or a directory inside the image (Dockerfile CAPTION_MODEL).
MODEL_DIR_REGEX = r"^(gs://[^/]+/|/).+$"
JSON_OBJECT_REGEX = r"^\{.*\}$"
INT_REGEX = r"^[0-9]+$"
FLOAT_REGEX = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)$"
BOOLEAN_REGEX = r"^(true|false)$"


def cli_flags(parser: argparse.ArgumentParser | None = None) -> list[argparse.Action]:
    """Every flag of the CLI (``--help`` left out), in the parser's order."""
    parser = parser or build_parser()
    return [a for a in parser._actions if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def is_switch(action: argparse.Action) -> bool:
    """A flag without a value: store_true / store_false, or a ``--x/--no-x`` pair (BooleanOptionalAction)."""
    return action.nargs == 0


def _label(action: argparse.Action) -> str:
    return action.dest.replace("_", " ").capitalize()


def _help(action: argparse.Action) -> str:
    if action.help and action.help != argparse.SUPPRESS:
        try:  # argparse's own %-formatting of help strings, e.g. "%(default)s"
            text = action.help % dict(vars(action), prog="beam-captions")
        except (KeyError, TypeError, ValueError):
            text = action.help
    elif is_switch(action):
        text = f"turn on {action.option_strings[0]}"
    elif action.choices:
        text = "one of " + ", ".join(map(str, action.choices))
    else:
        text = f"value of {action.option_strings[0]}"
    if action.nargs in ("+", "*"):
        text += " (one value here; the CLI takes several)"
    if _default(action) is not None and not is_switch(action) and f"default {action.default}" not in text:
        text += f" (default {action.default})"
    return f"{text} [{action.option_strings[0]}]"


def _default(action: argparse.Action) -> str | None:
    """The default as a template value, or None where there is none to show (None, [], suppressed)."""
    if action.default in (None, argparse.SUPPRESS) or isinstance(action.default, (list, tuple)):
        return None
    return str(action.default)


def parameter_for(action: argparse.Action) -> dict[str, Any]:
    """One Flex Template parameter (ParameterMetadata) for one CLI flag."""
    param: dict[str, Any] = {
        "name": action.dest,
        "label": _label(action),
        "helpText": _help(action),
        "isOptional": not action.required,
    }
    if is_switch(action):
        param.update(paramType="BOOLEAN", regexes=[BOOLEAN_REGEX], defaultValue=str(bool(action.default)).lower())
        return param
    if action.choices:
        param.update(
            paramType="ENUM",
            enumOptions=[{"value": str(choice)} for choice in action.choices],
            regexes=["^(" + "|".join(re.escape(str(c)) for c in action.choices) + ")$"],
        )
    elif action.type is int:
        param.update(paramType="NUMBER", regexes=[INT_REGEX])
    elif action.type is float:
        param.update(paramType="NUMBER", regexes=[FLOAT_REGEX])
    elif action.dest in NAMED_REGEXES:
        param.update(paramType="TEXT", regexes=[NAMED_REGEXES[action.dest]])
    elif action.dest.endswith("model_dir"):
        param.update(paramType="TEXT", regexes=[MODEL_DIR_REGEX])
    elif action.dest.endswith("vllm_kwargs"):
        param.update(paramType="TEXT", regexes=[JSON_OBJECT_REGEX])
    else:
        param["paramType"] = "TEXT"  # free text (prompts): any value
    if action.dest == "output":
        param["paramType"] = "GCS_WRITE_FOLDER"
    if _default(action) is not None:
        param["defaultValue"] = _default(action)
    return param


def build_metadata(parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    return {
        "name": TEMPLATE_NAME,
        "description": TEMPLATE_DESCRIPTION,
        "parameters": [parameter_for(action) for action in cli_flags(parser)],
    }


def render(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="exit 1 if metadata.json is out of date")
    args.add_argument("--path", default=METADATA_PATH)
    opts = args.parse_args(argv)
    text = render(build_metadata())
    if opts.check:
        current = open(opts.path, encoding="utf-8").read() if os.path.exists(opts.path) else ""
        if current != text:
            print(f"{opts.path} is out of date: run python templates/dataflow/make_metadata.py", file=sys.stderr)
            return 1
        return 0
    with open(opts.path, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(f"wrote {opts.path} ({len(build_metadata()['parameters'])} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
