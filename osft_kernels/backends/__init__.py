"""The backends, one module each, and how a backend name is resolved.

Each module's ``BACKEND`` is an :class:`osft_kernels.backend.Backend`: the row statistics of
:mod:`osft_kernels.row_stats` for a batch of token rows, their gradients, and for the chunked ones
(``torch``, ``triton``, ``cpu``, ``cuda``: the driver of :mod:`osft_kernels.driver` with their own
chunk kernels) the gradients of a sum of per-token losses formed during the forward pass. The
triton backend is imported only when it is used, so ``osft_kernels`` works without triton installed.
"""
import importlib
import importlib.util

import torch

from ..backend import Backend
from . import cpu, cuda_chunked, reference, torch_chunked

BACKENDS = ("reference", "torch", "triton", "cpu", "cuda")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_backend(device: torch.device) -> Backend:
    if not triton_installed():
        raise ValueError("backend 'triton' needs the triton package: pip install triton "
                         "(CUDA builds of torch on Linux include it)")
    from ..triton_kernels import configs  # the interpreter switch, read when the kernels are defined

    if device.type != "cuda" and not configs.INTERPRETING:
        raise ValueError(f"backend 'triton' needs CUDA tensors, got {device} tensors "
                         f"(set TRITON_INTERPRET=1 before importing osft_kernels to run it on CPU tensors)")
    return importlib.import_module(".triton_chunked", __name__).BACKEND


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


def resolve_backend(name, device: torch.device) -> Backend:
    """The backend ``name`` picks (:func:`backend_name`) for tensors on ``device``."""
    name = backend_name(name, device)
    if name == "triton":
        return _triton_backend(device)
    if name == "cpu":
        cpu.check_available(device)
    return {"reference": reference, "torch": torch_chunked, "cpu": cpu, "cuda": cuda_chunked}[name].BACKEND
