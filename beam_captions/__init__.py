"""beam-captions: caption and preview video windows with Qwen-VL on vLLM inside Apache Beam."""

__version__ = "0.1.0"

__all__ = ["read_captions"]


def __getattr__(name: str):
    """``beam_captions.read_captions``, imported on first use (it needs Beam and pyarrow)."""
    if name == "read_captions":
        from beam_captions.io.read_captions import read_captions

        return read_captions
    raise AttributeError(f"module 'beam_captions' has no attribute {name!r}")
