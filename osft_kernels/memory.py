"""Exact peak memory of the tensors an operation allocates, on any device (CPU included).

:class:`PeakMemory` is a ``TorchDispatchMode`` that records every tensor storage created inside
it and sweeps those that have been freed after each op, so ``peak_bytes`` is the largest total of
simultaneously live storages. Tensors that existed before entering (inputs, parameters) are not
counted, so the figure is the extra memory of the code inside. Memory that a library allocates
outside PyTorch (BLAS workspaces) is not seen.
"""
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 2**20


def _strided_tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.layout == torch.strided]


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as mem: ...``; then ``mem.peak_bytes`` / ``mem.peak_mib``."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self.current_bytes -= self._live.pop(key)[1]
        # an output sharing storage with an input (a view, an in-place or out= result) is not new memory
        seen = {t.untyped_storage()._cdata for t in _strided_tensors((args, kwargs))}
        for tensor in _strided_tensors(out):
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in seen and key not in self._live:
                self._live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.current_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out
