"""Backends compute the row statistics of :mod:`osft_kernels.row_stats` for a batch of token rows.

Each backend module provides ``row_stats(rows, weight, bias, softcap, *, entropy, mean, square, options)``;
the chunked ones (``torch``, ``triton``, ``cpu``: the driver of :mod:`osft_kernels.driver` with their
own chunk kernels) also provide ``summed_loss(rows, weight, bias, softcap, token_loss, *, entropy, mean,
options)``, which forms the gradients of a sum of per-token losses during the forward pass. The
triton backend is imported only when it is used, so ``osft_kernels`` works without triton installed.
"""
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from . import cpu, cuda_chunked, reference, torch_chunked

BACKENDS = ("reference", "torch", "triton", "cpu", "cuda")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_backend(device: torch.device) -> ModuleType:
    if not triton_installed():
        raise ValueError("backend 'triton' needs the triton package: pip install triton "
                         "(CUDA builds of torch on Linux include it)")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreting:
        raise ValueError(f"backend 'triton' needs CUDA tensors, got {device} tensors "
                         f"(set TRITON_INTERPRET=1 before importing osft_kernels to run it on CPU tensors)")
    return importlib.import_module(".triton_chunked", __name__)


def backend_name(name, device: torch.device) -> str:
    """The backend (one of :data:`BACKENDS`) that ``name`` picks for tensors on ``device``.

    ``"auto"``: for CUDA tensors ``"triton"`` when triton is installed, for CPU tensors ``"cpu"`` when
    its C++ extension is built, else ``"torch"``.
    """
    if name == "auto":
        if device.type == "cuda" and triton_installed():
            return "triton"
        return "cpu" if device.type == "cpu" and cpu.available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {name!r}")
    return name


def resolve_backend(name, device: torch.device) -> ModuleType:
    """The backend module for ``name`` (:func:`backend_name`) and tensors on ``device``."""
    name = backend_name(name, device)
    if name == "reference":
        return reference
    if name == "torch":
        return torch_chunked
    if name == "triton":
        return _triton_backend(device)
    if name == "cpu":
        cpu.check_available(device)
        return cpu
    return cuda_chunked
