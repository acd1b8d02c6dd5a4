"""Torch backend: the chunked driver (:mod:`osft_kernels.driver`) with an epilogue of PyTorch elementwise ops.

Runs on any device; on CPU it is the default when the C++ extension of the cpu backend is not
built. The logits chunk is transformed in place (bias, softcap, temperature), reduced per
``VOCAB_BLOCK``-column block with one work buffer (two with entropy), and overwritten by the float32
logit gradient.
"""
import torch
from torch import Tensor

from .. import driver
from ..driver import (
    FINITE_MIN,
    LOG_ZERO,
    PARTIAL_ENTROPY,
    PARTIAL_LOGIT_SUM,
    PARTIAL_MAX,
    PARTIAL_SQUARE_SUM,
    PARTIAL_SUM,
    VOCAB_BLOCK,
    Chunk,
    per_row,
)
from ..row_stats import ENTROPY, LSE, MEAN_LOGIT, TARGET_LOGIT


def _blocks(x: Tensor) -> list[Tensor]:
    """Views of ``x [r, w]`` as ``[r, k, VOCAB_BLOCK]`` full blocks and a ``[r, 1, w % VOCAB_BLOCK]`` tail."""
    full = x.shape[1] // VOCAB_BLOCK * VOCAB_BLOCK
    views = [x[:, :full].unflatten(1, (-1, VOCAB_BLOCK))] if full else []
    if full < x.shape[1]:
        views.append(x[:, full:].unsqueeze(1))
    return views


def _block_reduce(x: Tensor, reduce) -> Tensor:
    """``reduce`` over each block of every row: ``[r, w] -> [r, ceil(w / VOCAB_BLOCK)]``."""
    return torch.cat([reduce(view, -1) for view in _blocks(x)], 1)


def _sum_of_squares(x: Tensor, dim: int) -> Tensor:
    """``sum(x * x)`` along the last dim (``dim == -1``) as a batched dot product, without a temporary."""
    return torch.einsum("...i,...i->...", x, x)


def _block_sub(x: Tensor, per_block: Tensor, out: Tensor) -> None:
    """``out = x - per_block`` broadcast over each block's columns."""
    start = 0
    for x_view, out_view in zip(_blocks(x), _blocks(out)):
        count = x_view.shape[1]
        torch.sub(x_view, per_block[:, start:start + count, None], out=out_view)
        start += count


def _target_hits(chunk: Chunk, v0: int, w: int) -> tuple[Tensor, Tensor]:
    """Each row's target column within the chunk (clamped) and whether it lies there."""
    local = chunk.targets - v0
    return local.clamp(0, w - 1), (local >= 0) & (local < w)


class TorchEpilogue:
    """The :class:`osft_kernels.driver.Epilogue` in PyTorch ops."""

    def __init__(self):
        self._work: list[Tensor] = []

    def work_bytes(self, *, entropy: bool) -> int:
        return 4 * (3 if entropy else 2)

    def _buffer(self, index: int, like: Tensor) -> Tensor:
        """Work buffer ``index`` viewed at ``like``'s shape (grown as needed, reused across chunks)."""
        while len(self._work) <= index:
            self._work.append(like.new_empty(0))
        if self._work[index].numel() < like.numel():
            self._work[index] = like.new_empty(like.numel())
        return self._work[index][:like.numel()].view(like.shape)

    def logits(self, raw: Tensor, layer: driver.OutputLayer, chunk: Chunk, v0: int) -> Tensor:
        if layer.bias is not None:
            raw.add_(layer.bias[v0:v0 + raw.shape[1]])
        if layer.softcap is not None:
            raw.div_(layer.softcap).tanh_().mul_(layer.softcap)
        temperature = chunk.temperature
        if isinstance(temperature, Tensor) or temperature != 1.0:
            raw.div_(per_row(temperature))
        return raw

    def block_stats(self, z: Tensor, layer: driver.OutputLayer, chunk: Chunk, v0: int, partials: Tensor,
                    target_logit: Tensor, *, entropy: bool, mean: bool, square: bool) -> None:
        column, hit = _target_hits(chunk, v0, z.shape[1])
        target_logit.copy_(torch.where(hit, z.gather(1, column[:, None]).squeeze(1), target_logit))
        if mean:
            partials[..., PARTIAL_LOGIT_SUM] = _block_reduce(z, torch.sum)
        block_max = _block_reduce(z, torch.amax).clamp_(min=FINITE_MIN)
        partials[..., PARTIAL_MAX] = block_max
        shifted = self._buffer(0, z)
        _block_sub(z, block_max, out=shifted)
        if not (entropy or square):
            partials[..., PARTIAL_SUM] = _block_reduce(shifted.exp_(), torch.sum)
            return
        e = torch.exp(shifted, out=self._buffer(1, z))
        partials[..., PARTIAL_SUM] = _block_reduce(e, torch.sum)
        if square:
            partials[..., PARTIAL_SQUARE_SUM] = _block_reduce(e, _sum_of_squares)
        if entropy:
            partials[..., PARTIAL_ENTROPY] = _block_reduce(e.mul_(shifted.clamp_(min=LOG_ZERO)), torch.sum)

    def logit_grad(self, z: Tensor, layer: driver.OutputLayer, chunk: Chunk, v0: int, stats: Tensor, coef: Tensor,
                   grad_dtype: torch.dtype, *, entropy: bool, mean: bool) -> Tensor:
        if grad_dtype != z.dtype:
            raise TypeError(f"the torch epilogue writes the gradient in the compute dtype {z.dtype}, not {grad_dtype}")
        cap_factor = None
        if layer.softcap is not None:
            # 1 - tanh(s / softcap)^2, with tanh(s / softcap) = z * temperature / softcap
            cap_factor = torch.mul(z, per_row(chunk.temperature) / layer.softcap, out=self._buffer(0, z))
            cap_factor.square_().neg_().add_(1.0)
        g = z.sub_(stats[:, LSE, None])  # log p
        if entropy:
            # z - E[z] = log p + entropy
            p = torch.exp(g, out=self._buffer(1, z))
            g.clamp_(min=LOG_ZERO).add_(stats[:, ENTROPY, None]).mul_(-coef[:, ENTROPY, None])
            g.add_(coef[:, LSE, None]).mul_(p)
        else:
            g.exp_().mul_(coef[:, LSE, None])
        if mean:
            g.add_(coef[:, MEAN_LOGIT, None] / layer.vocab_size)
        column, hit = _target_hits(chunk, v0, g.shape[1])
        g.scatter_add_(1, column[:, None], torch.where(hit, coef[:, TARGET_LOGIT], 0.0)[:, None])
        if cap_factor is not None:
            g.mul_(cap_factor)
        return g


# fresh epilogue per call: its work buffers live for one call
BACKEND = driver.ChunkedBackend(lambda: driver.GemmEpilogue(TorchEpilogue())).backend("torch")
