"""Backends compute the row statistics of :mod:`osft_kernels.row_stats` for a batch of token rows.

Each backend module provides ``row_stats(rows, weight, bias, softcap, *, entropy, mean,
memory_budget)``; a backend that can form cross-entropy gradients during the forward pass also
provides ``summed_cross_entropy``.
"""
from types import ModuleType

from . import reference, torch_chunked

BACKENDS = {"reference": reference, "torch": torch_chunked}
PLANNED = {
    "triton": "the Triton kernels are not part of this release",
    "cpu": "the C++ CPU extension is not part of this release",
    "cuda": "the CUDA extension is not part of this release",
}


def resolve_backend(name) -> ModuleType:
    """The backend module for ``name``; ``"auto"`` picks the fastest one available (the chunked
    torch backend on every device until the compiled backends exist)."""
    if name == "auto":
        return torch_chunked
    if name in BACKENDS:
        return BACKENDS[name]
    if name in PLANNED:
        raise ValueError(f"backend {name!r} is not available: {PLANNED[name]}; "
                         f"use one of {['auto', *BACKENDS]}")
    raise ValueError(f"backend must be one of {['auto', *BACKENDS, *PLANNED]}, got {name!r}")
