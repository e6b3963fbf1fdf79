"""Let PyPI's CUDA torchvision import beside a CPU torch (installed as a ``.pth`` hook).

torchvision's compiled ops library cannot load against the CPU build of torch, and
its import then fails with "operator torchvision::nms does not exist". Right
before torchvision is first imported, this hook declares the op schemas that
torchvision's Python code registers fake kernels for. It is only installed on
machines without an NVIDIA GPU (see scripts/setup.sh).
"""

import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries = []


def _declare_ops() -> None:
    import torch

    if hasattr(torch.ops.torchvision, "nms"):
        return
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _libraries.append(library)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            try:
                _declare_ops()
            except Exception as error:  # never break an unrelated import
                print(f"torchvision_cpu_shim: {error}", file=sys.stderr)
        return None


sys.meta_path.insert(0, _BeforeTorchvision())
