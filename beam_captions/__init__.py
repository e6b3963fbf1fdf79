"""beam-captions: caption and preview video windows with Qwen-VL on vLLM inside Apache Beam."""

__version__ = "0.1.0"
