"""hiss.kernels: optional compiled fast paths (built on first use, never at import).

``kernels.cpu`` holds the C++ CPU kernels (selective scan, SSD through the scan, causal conv1d, decode
steps); ``kernels.cpu.available()`` tells whether they could be built here. ``kernels.triton`` holds
the Triton kernels. ``kernels.shape_checks`` holds the argument and shape rules shared by both
front-ends and by ssm_core's PyTorch path (pure Python, imports only torch). Nothing heavy is imported
until a submodule is used; ``kernels`` never imports ``ssm_core``.
"""

from __future__ import annotations

import importlib

__all__ = ["cpu"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
