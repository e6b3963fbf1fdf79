"""One PTransform per stage: read, prepare, preview, caption, enhance, write; and compact (a job of its own).

Each is imported on first use, so that importing one stage (say ``prepare`` on a CPU worker)
does not import the others' machinery (the inference engine).
"""

import importlib

_MODULES = {
    "ReadClips": "read",
    "PrepareWindows": "prepare",
    "GeneratePreviews": "previews",
    "CaptionWindows": "caption",
    "EnhanceCaptions": "enhance",
    "WriteOutputs": "write",
    "CompactCaptions": "compact",
}

__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
