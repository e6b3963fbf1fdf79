"""Building a vLLM engine: the settings it gets, and a thread-safe wrapper around it."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = ["EngineSettings", "Engine", "llm_kwargs", "load_engine", "release_engines"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    """What ``vllm.LLM`` is built with; ``extra`` (``--vllm-kwargs``) overrides the rest."""

    model_dir: str
    fp8: bool = False
    disable_mmcache: bool = True
    dtype: str = "auto"
    max_model_len: int = 32768
    gpu_memory_utilization: float = 0.85
    multimodal: bool = True
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # The hub checkpoint a local ``model_dir`` without weights is downloaded from (revision None: the pinned one).
    hub_model_id: Optional[str] = None
    hub_revision: Optional[str] = None


def llm_kwargs(settings: EngineSettings) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` (the reference's settings, then the user's overrides)."""
    kwargs: dict[str, Any] = {
        "model": settings.model_dir,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "max_num_batched_tokens": settings.max_model_len,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "trust_remote_code": settings.trust_remote_code,
    }
    if settings.multimodal:
        kwargs["limit_mm_per_prompt"] = {"image": 0, "video": 1}
        kwargs["mm_processor_kwargs"] = {"cap_pixels_per_frame": True}  # the reference's (qwen-vl-utils) frame cap
        if settings.disable_mmcache:
            kwargs["mm_processor_cache_gb"] = 0
    if settings.fp8:
        kwargs["quantization"] = "fp8"
    kwargs.update(settings.extra)
    return kwargs


class Engine:
    """A ``vllm.LLM`` started on first use; ``generate`` is safe to call from several threads.

    Starting lazily means a worker that gets no window (say, a re-run where every clip is
    already done) never loads the model.
    """

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.name = os.path.basename(os.path.normpath(settings.model_dir))
        self._llm: Any = None
        self._start_lock = threading.Lock()
        self._generate_lock = threading.Lock()

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM``, started now if it was not yet."""
        with self._start_lock:
            if self._llm is None:
                from vllm import LLM

                from beam_captions.inference.model_source import resolve_model_dir

                kwargs = llm_kwargs(self.settings)
                settings = self.settings
                if "model" not in settings.extra:  # a gs:// prefix or an empty folder becomes local weights
                    kwargs["model"] = resolve_model_dir(
                        settings.model_dir, model_id=settings.hub_model_id, revision=settings.hub_revision
                    )
                log.info("starting vLLM: %s", json.dumps(kwargs, default=str))
                self._llm = LLM(**kwargs)
            return self._llm

    def start(self) -> "Engine":
        self.llm
        return self

    @property
    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def generate(self, inputs: Sequence[dict], sampling_params: Any) -> list:
        llm = self.llm
        with self._generate_lock:
            return llm.generate(list(inputs), sampling_params, use_tqdm=False)

    def restart(self) -> "Engine":
        """Shut the engine down and start a new one (after it died)."""
        with self._start_lock:
            self.shutdown()
        return self.start()

    def shutdown(self) -> None:
        core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        self._llm = None
        if core is not None:
            try:
                core.shutdown()
            except Exception as error:  # noqa: BLE001 - a dead engine may not shut down cleanly
                log.warning("engine shutdown: %s", error)

    def render_chat(self, messages: list[dict], **template_kwargs: Any) -> str:
        """``messages`` rendered with the model directory's chat template, ready for generation."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template_kwargs
        )


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def load_engine(settings: EngineSettings) -> Engine:
    """The process's engine for ``settings`` (one per distinct settings, shared); it starts on first use."""
    key = json.dumps(llm_kwargs(settings), sort_keys=True, default=str)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = Engine(settings)
        return _engines[key]


def release_engines(only: Optional[Engine] = None) -> None:
    """Shut down ``only``, or every engine this process started (at the end of a local run)."""
    with _engines_lock:
        keys = [key for key, engine in _engines.items() if only is None or engine is only]
        engines = [_engines.pop(key) for key in keys]
    for engine in engines:
        engine.shutdown()
