"""Chunked PyTorch backend: exact results while holding only a bounded chunk of logits.

Tokens are processed ``plan.rows`` at a time and the vocabulary ``plan.vocab`` columns at a time
(all of V unless the memory budget cannot hold ``ROW_ALIGN`` full rows). Half-precision inputs are
computed in float32: on CPUs without AVX-512-BF16/AMX, bf16 GEMMs are several times slower than
float32 and a bf16 cross-entropy step ~30x slower (``benchmarks/cpu_compute_dtype.py``).

Two gradient strategies, both exact:

* :class:`RowStatsFunction` (``linear_logprobs``, ``reduction="none"``) saves only the ``[n, 4]``
  row statistics and recomputes each chunk's logits in backward: 2NDV forward + 6NDV backward,
  for any upstream gradient.
* :class:`SummedCrossEntropyFunction` (``reduction="sum"/"mean"``) knows every token's loss
  weight at forward time, so it forms each chunk's logit gradient right after the chunk's
  statistics and accumulates ``d_hidden [n, D]`` and ``d_weight [V, D]`` (float32) during the
  forward; backward only scales them by the scalar upstream gradient. 6NDV in all when the
  vocabulary fits in one chunk (otherwise the logits are recomputed once per chunk: 8NDV). The
  trade: both gradients are held in float32 from forward to backward (``4 (N + V) D`` bytes,
  where the recomputing path holds ``O(N)``), and scaled and rounded to the input dtype once.

Batch invariance: a token's statistics are bitwise independent of the other rows in the batch and
of the chunk sizes. Every logits GEMM has a row count that is a multiple of ``ROW_ALIGN`` (the last
token chunk is zero-padded), which makes the BLAS compute each row the same way, and every row
reduction runs over fixed ``VOCAB_BLOCK``-column blocks merged in block order, whatever the
vocabulary chunk. Measured for the CPU BLAS in ``tests/test_invariance.py``; on CUDA the torch
backend does not guarantee it.
"""
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..inputs import BackendOptions, TokenRows, compute_dtype
from ..row_stats import ENTROPY, LSE, MEAN_LOGIT, NUM_STATS, TARGET_LOGIT, cross_entropy_stat_grads

VOCAB_BLOCK = 2048
ROW_ALIGN = 16
DEFAULT_MEMORY_BUDGET = 128 * 2**20


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ChunkPlan:
    """``rows`` tokens (a multiple of ``ROW_ALIGN``) by ``vocab`` columns (V or a multiple of
    ``VOCAB_BLOCK``), in ``buffers`` chunk-sized work buffers."""

    rows: int
    vocab: int
    buffers: int

    def row_ranges(self, num_rows: int) -> Iterator[tuple[int, int]]:
        return ((r0, min(num_rows, r0 + self.rows)) for r0 in range(0, num_rows, self.rows))

    def vocab_ranges(self, vocab_size: int) -> Iterator[tuple[int, int]]:
        return ((v0, min(vocab_size, v0 + self.vocab)) for v0 in range(0, vocab_size, self.vocab))


def plan_chunks(num_rows: int, vocab_size: int, *, buffers: int, element_size: int,
                memory_budget: int | None) -> ChunkPlan:
    """Largest chunk whose ``buffers`` work buffers fit in ``memory_budget`` bytes (default 128 MiB)."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    minimum = buffers * element_size * ROW_ALIGN * min(vocab_size, VOCAB_BLOCK)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < minimum:
        raise ValueError(f"memory_budget must be None or an int of at least {minimum} bytes for V={vocab_size}, "
                         f"got {memory_budget!r}")
    row_bytes = buffers * element_size * vocab_size
    if budget >= ROW_ALIGN * row_bytes:
        rows = budget // row_bytes // ROW_ALIGN * ROW_ALIGN
        rows = min(rows, _ceil_div(max(num_rows, 1), ROW_ALIGN) * ROW_ALIGN)
        return ChunkPlan(rows, vocab_size, buffers)
    vocab = budget // (buffers * element_size * ROW_ALIGN) // VOCAB_BLOCK * VOCAB_BLOCK
    return ChunkPlan(ROW_ALIGN, vocab, buffers)


def _per_row(temperature: float | Tensor) -> float | Tensor:
    """A float, or ``[r] -> [r, 1]`` to broadcast over a chunk's columns."""
    return temperature[:, None] if isinstance(temperature, Tensor) else temperature


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


def _block_sub(x: Tensor, per_block: Tensor, out: Tensor) -> None:
    """``out = x - per_block`` broadcast over each block's columns (``out`` may be ``x``)."""
    start = 0
    for x_view, out_view in zip(_blocks(x), _blocks(out)):
        count = x_view.shape[1]
        torch.sub(x_view, per_block[:, start:start + count, None], out=out_view)
        start += count


class _OutputLayer:
    """``weight [V, D]`` and ``bias [V]`` in the compute dtype, and the map from hidden rows to logits."""

    def __init__(self, weight: Tensor, bias: Tensor | None, softcap: float | None):
        dtype = compute_dtype(weight.dtype)
        self.weight = weight.detach().to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.softcap = softcap
        self.vocab_size = weight.shape[0]

    def logits(self, out: Tensor, hidden: Tensor, v0: int, v1: int, temperature: float | Tensor) -> Tensor:
        """``z = softcap(hidden @ weight[v0:v1].T + bias[v0:v1]) / temperature`` written into ``out [r, v1-v0]``."""
        torch.mm(hidden, self.weight[v0:v1].t(), out=out)
        if self.bias is not None:
            out.add_(self.bias[v0:v1])
        if self.softcap is not None:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        if isinstance(temperature, Tensor) or temperature != 1.0:
            out.div_(_per_row(temperature))
        return out


class _Workspace:
    """The plan's chunk buffers, allocated once per call and viewed at each chunk's shape."""

    def __init__(self, plan: ChunkPlan, dtype: torch.dtype, device: torch.device):
        self._flat = [torch.empty(plan.rows * plan.vocab, dtype=dtype, device=device) for _ in range(plan.buffers)]

    def buffer(self, index: int, rows: int, cols: int) -> Tensor:
        return self._flat[index][:rows * cols].view(rows, cols)


@dataclass
class _Chunk:
    """One token chunk: ``hidden [r, D]`` in the compute dtype, ``targets [r]``, ``temperature``.

    :meth:`of` zero-pads the rows to a multiple of ``ROW_ALIGN`` so that every logits GEMM, in
    forward and in backward, has the same shape for the same rows; :meth:`head` drops the padding.
    """

    hidden: Tensor
    targets: Tensor
    temperature: float | Tensor

    @classmethod
    def of(cls, rows: TokenRows, r0: int, r1: int) -> "_Chunk":
        hidden = rows.hidden[r0:r1].to(compute_dtype(rows.hidden.dtype))
        targets = rows.targets[r0:r1]
        temperature = rows.temperature
        if isinstance(temperature, Tensor):
            temperature = temperature[r0:r1]
        pad = _ceil_div(r1 - r0, ROW_ALIGN) * ROW_ALIGN - (r1 - r0)
        if pad:
            hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
            targets = torch.cat([targets, targets.new_zeros(pad)])
            if isinstance(temperature, Tensor):
                temperature = torch.cat([temperature, temperature.new_ones(pad)])
        return cls(hidden.contiguous(), targets, temperature)

    def head(self, r: int) -> "_Chunk":
        temperature = self.temperature[:r] if isinstance(self.temperature, Tensor) else self.temperature
        return _Chunk(self.hidden[:r], self.targets[:r], temperature)


def _chunk_stats(layer: _OutputLayer, chunk: _Chunk, plan: ChunkPlan, work: _Workspace, *,
                 entropy: bool, mean: bool, keep_logits: bool) -> Tensor:
    """Row statistics ``[r, 4]`` of one token chunk.

    With ``keep_logits`` (needs a single vocabulary chunk and no entropy) buffer 0 still holds the
    chunk's logits afterwards.
    """
    r, vocab_size = chunk.hidden.shape[0], layer.vocab_size
    num_blocks = _ceil_div(vocab_size, VOCAB_BLOCK)
    new = chunk.hidden.new_empty
    block_max, block_sum = new(r, num_blocks), new(r, num_blocks)
    block_logit_sum = new(r, num_blocks) if mean else None
    block_entropy_sum = new(r, num_blocks) if entropy else None
    target_logit = chunk.hidden.new_zeros(r)
    for v0, v1 in plan.vocab_ranges(vocab_size):
        b0, b1 = v0 // VOCAB_BLOCK, _ceil_div(v1, VOCAB_BLOCK)
        z = layer.logits(work.buffer(0, r, v1 - v0), chunk.hidden, v0, v1, chunk.temperature)
        local = chunk.targets - v0
        hit = (local >= 0) & (local < v1 - v0)
        picked = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
        target_logit = torch.where(hit, picked, target_logit)
        if mean:
            block_logit_sum[:, b0:b1] = _block_reduce(z, torch.sum)
        block_max[:, b0:b1] = _block_reduce(z, torch.amax)
        e = work.buffer(1, r, v1 - v0)
        if keep_logits:
            _block_sub(z, block_max[:, b0:b1], out=e)
            e.exp_()
        else:
            _block_sub(z, block_max[:, b0:b1], out=z)  # z now holds z - block max
            torch.exp(z, out=e)
        block_sum[:, b0:b1] = _block_reduce(e, torch.sum)
        if entropy:
            block_entropy_sum[:, b0:b1] = _block_reduce(e.mul_(z), torch.sum)

    row_max = block_max.amax(1, keepdim=True)
    block_offset = block_max - row_max
    scale = block_offset.exp()
    total = (block_sum * scale).sum(1)
    stats = chunk.hidden.new_zeros(r, NUM_STATS)
    stats[:, LSE] = row_max.squeeze(1) + total.log()
    stats[:, TARGET_LOGIT] = target_logit
    if mean:
        stats[:, MEAN_LOGIT] = block_logit_sum.sum(1) / vocab_size
    if entropy:
        # sum_j p_j (z_j - max) from each block's sum of e^(z - m_b) (z - m_b), shifted to the row max
        shifted = (scale * (block_entropy_sum + block_offset * block_sum)).sum(1) / total
        stats[:, ENTROPY] = total.log() - shifted
    return stats


def _logit_grad(layer: _OutputLayer, chunk: _Chunk, work: _Workspace, z: Tensor, v0: int, stats: Tensor,
                coef: Tensor, *, with_entropy: bool, with_mean: bool) -> Tensor:
    """Gradient on the pre-softcap logits ``[r, w]`` of columns ``v0:v0+w``; ``z`` (buffer 0) is consumed.

    ``coef [r, 4]`` are the gradients on the row statistics already divided by temperature:
    ``dz_j = p_j (c_lse - c_ent (z_j - E[z])) + c_mean / V + c_target [j == y]``, then the softcap
    chain rule ``1 - tanh^2``. ``with_entropy``/``with_mean``: whether those coefficients can be nonzero.
    """
    r, w = z.shape
    g = work.buffer(1, r, w)
    torch.sub(z, stats[:, LSE, None], out=g)  # log p
    if not with_entropy:
        g.exp_().mul_(coef[:, LSE, None])
    else:
        # z - E[z] = log p + entropy
        p = work.buffer(2, r, w) if layer.softcap is not None else z
        torch.exp(g, out=p)
        g.add_(stats[:, ENTROPY, None]).mul_(-coef[:, ENTROPY, None]).add_(coef[:, LSE, None]).mul_(p)
    if with_mean:
        g.add_(coef[:, MEAN_LOGIT, None] / layer.vocab_size)
    local = chunk.targets - v0
    hit = (local >= 0) & (local < w)
    g.scatter_add_(1, local.clamp(0, w - 1)[:, None], torch.where(hit, coef[:, TARGET_LOGIT], 0.0)[:, None])
    if layer.softcap is not None:
        # tanh(s / softcap) = z * temperature / softcap
        g.mul_(z.mul_(_per_row(chunk.temperature) / layer.softcap).square_().neg_().add_(1.0))
    return g


class _GradAccumulator:
    """Gradients of hidden rows, weight and bias, accumulated in the compute dtype."""

    def __init__(self, layer: _OutputLayer, num_rows: int, needs: tuple[bool, bool, bool]):
        weight = layer.weight
        self.layer = layer
        self.hidden = weight.new_zeros(num_rows, weight.shape[1]) if needs[0] else None
        self.weight = torch.zeros_like(weight) if needs[1] else None
        self.bias = weight.new_zeros(layer.vocab_size) if needs[2] and layer.bias is not None else None

    def add(self, chunk_hidden: Tensor, dz: Tensor, v0: int, v1: int, r0: int) -> None:
        """Accumulate ``dz [r, v1-v0]`` of the token chunk starting at row ``r0``."""
        if self.hidden is not None:
            self.hidden[r0:r0 + dz.shape[0]].addmm_(dz, self.layer.weight[v0:v1])
        if self.weight is not None:
            self.weight[v0:v1].addmm_(dz.t(), chunk_hidden)
        if self.bias is not None:
            self.bias[v0:v1] += dz.sum(0)

    def grads(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.hidden, self.weight, self.bias


def _cast(grads, dtypes) -> tuple:
    return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes))


def _setup(weight: Tensor, bias: Tensor | None, softcap: float | None, num_rows: int, *, entropy: bool,
           memory_budget: int | None) -> tuple[_OutputLayer, ChunkPlan, _Workspace]:
    """The output layer, the chunk plan for ``num_rows`` tokens and its work buffers.

    Two buffers (logits, exp/gradient), plus one for p when an entropy gradient meets softcap.
    """
    layer = _OutputLayer(weight, bias, softcap)
    dtype = layer.weight.dtype
    plan = plan_chunks(num_rows, layer.vocab_size, buffers=3 if entropy and softcap is not None else 2,
                       element_size=dtype.itemsize, memory_budget=memory_budget)
    return layer, plan, _Workspace(plan, dtype, weight.device)


class RowStatsFunction(torch.autograd.Function):
    """``(hidden [n, D], weight [V, D], bias [V] | None) -> row statistics [n, 4]``; backward recomputes."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows: TokenRows, softcap, entropy: bool, mean: bool, memory_budget):
        n = hidden.shape[0]
        layer, plan, work = _setup(weight, bias, softcap, n, entropy=entropy, memory_budget=memory_budget)
        stats = hidden.new_empty(n, NUM_STATS, dtype=layer.weight.dtype)
        for r0, r1 in plan.row_ranges(n):
            chunk = _Chunk.of(rows, r0, r1)
            stats[r0:r1] = _chunk_stats(layer, chunk, plan, work, entropy=entropy, mean=mean,
                                        keep_logits=False)[:r1 - r0]
        ctx.rows, ctx.softcap, ctx.entropy, ctx.mean, ctx.memory_budget = rows, softcap, entropy, mean, memory_budget
        ctx.save_for_backward(hidden, weight, bias, stats)
        return stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_stats):
        hidden, weight, bias, stats = ctx.saved_tensors
        rows, n = ctx.rows, hidden.shape[0]
        layer, plan, work = _setup(weight, bias, ctx.softcap, n, entropy=ctx.entropy, memory_budget=ctx.memory_budget)
        coef = grad_stats.to(layer.weight.dtype) / _per_row(rows.temperature)
        with_entropy = ctx.entropy and bool(coef[:, ENTROPY].any())
        with_mean = ctx.mean and bool(coef[:, MEAN_LOGIT].any())
        grads = _GradAccumulator(layer, n, ctx.needs_input_grad[:3])
        for r0, r1 in plan.row_ranges(n):
            chunk = _Chunk.of(rows, r0, r1)
            real = chunk.head(r1 - r0)
            for v0, v1 in plan.vocab_ranges(layer.vocab_size):
                z = layer.logits(work.buffer(0, chunk.hidden.shape[0], v1 - v0), chunk.hidden, v0, v1,
                                 chunk.temperature)[:r1 - r0]
                dz = _logit_grad(layer, real, work, z, v0, stats[r0:r1], coef[r0:r1],
                                 with_entropy=with_entropy, with_mean=with_mean)
                grads.add(real.hidden, dz, v0, v1, r0)
        dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        return (*_cast(grads.grads(), dtypes), None, None, None, None, None)


class SummedCrossEntropyFunction(torch.autograd.Function):
    """``sum_i token_weight_i * cross_entropy_i`` with the gradients formed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows: TokenRows, softcap, token_weight: Tensor,
                label_smoothing: float, z_loss: float, memory_budget):
        n = hidden.shape[0]
        layer, plan, work = _setup(weight, bias, softcap, n, entropy=False, memory_budget=memory_budget)
        grads = _GradAccumulator(layer, n, ctx.needs_input_grad[:3])
        keep_logits = plan.vocab == layer.vocab_size
        loss = hidden.new_zeros((), dtype=layer.weight.dtype)
        for r0, r1 in plan.row_ranges(n):
            chunk = _Chunk.of(rows, r0, r1)
            real = chunk.head(r1 - r0)
            stats = _chunk_stats(layer, chunk, plan, work, entropy=False, mean=label_smoothing > 0,
                                 keep_logits=keep_logits)[:r1 - r0]
            chunk_loss, coef = cross_entropy_stat_grads(stats, token_weight[r0:r1], label_smoothing, z_loss)
            loss += chunk_loss
            coef /= _per_row(real.temperature)
            for v0, v1 in plan.vocab_ranges(layer.vocab_size):
                z = work.buffer(0, chunk.hidden.shape[0], v1 - v0)
                if not keep_logits:
                    layer.logits(z, chunk.hidden, v0, v1, chunk.temperature)
                dz = _logit_grad(layer, real, work, z[:r1 - r0], v0, stats, coef,
                                 with_entropy=False, with_mean=label_smoothing > 0)
                grads.add(real.hidden, dz, v0, v1, r0)
        # kept in the compute dtype so that scaling by the upstream gradient rounds only once
        saved = grads.grads()
        ctx.save_for_backward(*(torch.empty(0) if g is None else g for g in saved))
        ctx.has_grad = tuple(g is not None for g in saved)
        ctx.dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # an unscaled float32 gradient is handed over as is, and autograd can adopt it without a copy
        unit = bool(grad_loss == 1)
        scaled = [(g if unit else g * grad_loss.to(g.dtype)) if has else None
                  for g, has in zip(ctx.saved_tensors, ctx.has_grad)]
        return (*_cast(scaled, ctx.dtypes), None, None, None, None, None, None)


def row_stats(rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None, *,
              entropy: bool, mean: bool, options: BackendOptions) -> Tensor:
    """Differentiable ``[n, 4]`` statistics of ``rows`` (see :mod:`osft_kernels.row_stats`)."""
    return RowStatsFunction.apply(rows.hidden, weight, bias, rows, softcap, entropy, mean, options.memory_budget)


def summed_cross_entropy(rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None,
                         token_weight: Tensor, label_smoothing: float, z_loss: float, *,
                         options: BackendOptions) -> Tensor:
    """Differentiable ``sum_i token_weight_i * cross_entropy_i``, gradients formed in forward."""
    return SummedCrossEntropyFunction.apply(rows.hidden, weight, bias, rows, softcap, token_weight,
                                            label_smoothing, z_loss, options.memory_budget)
