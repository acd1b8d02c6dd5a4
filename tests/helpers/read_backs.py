"""Count the values code reads back from tensors to Python (``item``, ``tolist``, ``bool``): on a GPU
each one waits for the device."""
import sys

import torch


def record_read_backs(monkeypatch, *prefixes: str) -> list[str]:
    """Patch ``Tensor.item``, ``tolist`` and ``__bool__`` (undone by ``monkeypatch``) so that every call
    made from a file whose path starts with one of ``prefixes`` appends ``"file:function"`` to the
    returned list."""
    reads = []

    def counted(method):
        def read(self, *args):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(prefixes):
                reads.append(f"{caller.co_filename}:{caller.co_name}")
            return method(self, *args)
        return read

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    return reads
