"""The chunked driver: row statistics and their gradients through vendor GEMMs and a pluggable epilogue.

Every backend but ``reference`` runs this loop. It cuts the ``[n, V]`` logits into fixed-shape chunks
(:func:`plan_chunks`) and hands each chunk and vocabulary range to the backend's :class:`ChunkKernels`.
For ``torch`` and ``triton`` that is :class:`GemmEpilogue`: one GEMM into a float32 buffer
(:class:`Gemms`: cuBLAS on CUDA, the CPU BLAS on CPU), then an :class:`Epilogue` that reduces it to
per-block softmax statistics or overwrites it with the logit gradient, which feeds the two gradient
GEMMs ``d_hidden += dz @ W[chunk]`` and ``d_weight[chunk] += dz^T @ H``. The ``cpu`` backend runs the
same GEMMs and epilogue in C++ tiles that stay in cache. Gradients are accumulated in float32 in a
fixed order: no atomics, so they are deterministic.

Two gradient strategies:

* :class:`RowStatsFunction`: forward saves only the ``[n, NUM_STATS]`` statistics; backward recomputes each
  chunk's logits for any upstream gradient on them. 2NDV + 6NDV FLOPs. Chunks are near square
  (``rows ~ vocab``), which minimizes the float32 accumulator traffic of the backward; the backward
  runs one vocabulary range at a time over all token chunks, so half-precision weights need a float32
  accumulator of one range, not of the whole ``[V, D]`` gradient.
* :class:`SummedLossFunction`: for ``sum_i f_i(stats_i)`` whose per-token terms are known at forward
  time (weighted cross-entropy, policy-gradient losses), each token chunk spans the whole vocabulary:
  statistics, then the per-token coefficients by autograd on ``f`` (so every loss formula exists once),
  then the logit gradient in place and both gradient GEMMs. 6NDV; backward only scales the float32
  gradients. When the memory budget cannot hold ``MIN_FULL_ROWS`` full rows, :func:`summed_loss` takes
  the statistics through :class:`RowStatsFunction` instead (8NDV).

Batch invariance: every logits GEMM has a row count that is a multiple of ``ROW_ALIGN`` (16; 256 on
CUDA; the last token chunk is zero-padded) and every row reduction runs over fixed
``VOCAB_BLOCK``-column blocks merged in block order (:func:`merge_blocks`), whatever the chunk
sizes. Whether a row's GEMM output is then independent of the other rows is the BLAS's property:
measured for the CPU BLAS in ``tests/kernels/test_invariance.py``, and on an H200 by
``benchmarks/gpu_checks.py``; cuBLAS does not promise it.
"""
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from .backend import Backend
from .row_stats import ENTROPY, LSE, MAX_LOGIT, MEAN_LOGIT, NUM_STATS, SQUARE_LSE, TARGET_LOGIT, stat_grads
from .token_rows import TokenRows, compute_dtype, hidden_grad

VOCAB_BLOCK = 2048
ROW_ALIGN = 16
# cuBLAS picks its kernel by shape; on an H200 (cuBLAS 13) rows of products with 16 or 64 rows came out
# differently from the same rows in 4096-row products, those with 256 or more did not
CUDA_ROW_ALIGN = 256
# per-block partial statistics: running max m, sum e^(z-m), sum e^(z-m) (z-m), sum z, sum e^(2(z-m))
NUM_PARTIALS = 5
PARTIAL_MAX, PARTIAL_SUM, PARTIAL_ENTROPY, PARTIAL_LOGIT_SUM, PARTIAL_SQUARE_SUM = range(NUM_PARTIALS)
DEFAULT_MEMORY_BUDGET = {"cpu": 128 * 2**20, "cuda": 1024 * 2**20}
# token chunks that span the vocabulary need at least this many rows: the weight gradient is a product
# over a chunk's rows added into its [V, D] float32 accumulator once per chunk, and with fewer rows that
# accumulator's memory traffic costs about what the recomputing strategy's extra logits product does
# (measured on CPU: bfloat16, V = 262144, 64-row chunks), which needs no [V, D] accumulator at all
MIN_FULL_ROWS = 128
FINITE_MIN = -3.0e38  # a block max of -inf (a fully masked block) is clamped here so that z - max stays finite
# below log of float64's smallest subnormal (-745): e^x is exactly 0 here, so log-probabilities clamped to it
# keep p = 0 and turn the 0 * -inf of a -inf logit (a masked vocabulary entry) into 0 * LOG_ZERO = 0
LOG_ZERO = -1.0e4

TokenLoss = Callable[[Tensor, int, int], Tensor]
MakeKernels = Callable[[], "ChunkKernels"]  # fresh kernels, whose work buffers live as long as they do


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def default_memory_budget(device: torch.device) -> int:
    return DEFAULT_MEMORY_BUDGET["cuda" if device.type == "cuda" else "cpu"]


def row_align(device: torch.device) -> int:
    return CUDA_ROW_ALIGN if device.type == "cuda" else ROW_ALIGN


@dataclass(frozen=True)
class ChunkPlan:
    """``rows`` tokens (a multiple of the row alignment) by ``vocab`` columns (V or a multiple of ``VOCAB_BLOCK``)."""

    rows: int
    vocab: int

    def row_ranges(self, num_rows: int) -> Iterator[tuple[int, int]]:
        return ((r0, min(num_rows, r0 + self.rows)) for r0 in range(0, num_rows, self.rows))

    def vocab_ranges(self, vocab_size: int) -> Iterator[tuple[int, int]]:
        return ((v0, min(vocab_size, v0 + self.vocab)) for v0 in range(0, vocab_size, self.vocab))

    @property
    def entries(self) -> int:
        return self.rows * self.vocab


def plan_chunks(num_rows: int, vocab_size: int, *, entry_bytes: int, memory_budget: int, full_rows: bool,
                align: int = ROW_ALIGN) -> ChunkPlan | None:
    """The chunk shape whose buffers (``entry_bytes`` per logit) fit in ``memory_budget`` bytes.

    ``full_rows``: chunks span the whole vocabulary (None if fewer than ``max(MIN_FULL_ROWS, align)``
    rows fit); otherwise near-square chunks. The shape depends on V and the budget, never on
    ``num_rows`` (which only caps the row count at the padded batch). Row counts are multiples of ``align``.
    """
    minimum = entry_bytes * align * min(vocab_size, VOCAB_BLOCK)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < minimum:
        raise ValueError(f"memory_budget must be None or an int of at least {minimum} bytes for V={vocab_size} "
                         f"(or 0 with backend='triton' and no gradients: the fused forward), got {memory_budget!r}")
    entries = memory_budget // entry_bytes
    if full_rows:
        if entries < max(align, MIN_FULL_ROWS) * vocab_size:
            return None
        vocab = vocab_size
    else:
        side = max(VOCAB_BLOCK, math.isqrt(entries) // VOCAB_BLOCK * VOCAB_BLOCK)
        vocab = min(vocab_size, side)
    rows = entries // vocab // align * align
    return ChunkPlan(min(rows, ceil_div(max(num_rows, 1), align) * align), vocab)


class Gemms:
    """The driver's three products through the vendor BLAS, in one dtype policy.

    Half-precision inputs on CUDA stay half precision as GEMM operands (tensor cores) with float32
    output and accumulation; the logit gradient is written in the input dtype too. Elsewhere the
    operands are the compute dtype (float32, float64 for float64 inputs), because the CPU BLAS has no
    half x half -> float32 product, unless ``half_on_cpu``: the cpu backend's own bfloat16 products.
    float32 inputs on CUDA follow ``torch.backends.cuda.matmul`` (``torch.set_float32_matmul_precision``):
    exact float32 by default, TF32 when allowed.
    float16 gradients are scaled by a power of two per chunk so that small entries do not underflow.
    """

    def __init__(self, input_dtype: torch.dtype, device: torch.device, *, half_on_cpu: bool = False):
        half = input_dtype in (torch.bfloat16, torch.float16)
        self.mixed = half and (device.type == "cuda" or half_on_cpu)
        self.operand_dtype = input_dtype if self.mixed else compute_dtype(input_dtype)
        self.grad_dtype = self.operand_dtype
        self.scaled = self.grad_dtype == torch.float16

    def logits(self, out: Tensor, hidden: Tensor, weight: Tensor) -> Tensor:
        """``out [r, w] = hidden [r, D] @ weight [w, D]^T`` in float32 (the compute dtype)."""
        if self.mixed:
            return torch.mm(hidden, weight.t(), out_dtype=out.dtype, out=out)
        return torch.mm(hidden, weight.t(), out=out)

    def accumulate(self, acc: Tensor, a: Tensor, b: Tensor, alpha: float) -> None:
        """``acc += alpha * a @ b`` with ``acc`` in the compute dtype."""
        if not self.mixed:
            acc.addmm_(a, b, alpha=alpha)
        elif _float32_accumulator_addmm(a.dtype):
            torch.addmm(acc, a, b, out_dtype=acc.dtype, alpha=alpha, out=acc)
        else:  # a product slice at a time into a bounded temporary
            for start in range(0, acc.shape[0], ACCUMULATE_SLICE):
                rows = slice(start, start + ACCUMULATE_SLICE)
                acc[rows].add_(torch.mm(a[rows], b, out_dtype=acc.dtype), alpha=alpha)

    def grad_scale(self, coef: Tensor) -> float:
        """A power of two that brings the largest coefficient of ``coef`` near 1 (float16), else 1."""
        if not self.scaled or coef.numel() == 0:
            return 1.0
        largest = float(coef.abs().max())
        return 1.0 if largest == 0 or not math.isfinite(largest) else 2.0 ** -math.floor(math.log2(largest))


ACCUMULATE_SLICE = 8192  # rows of the temporary product where addmm cannot accumulate into float32


@functools.cache
def _float32_accumulator_addmm(dtype: torch.dtype) -> bool:
    """Whether this torch's CUDA ``addmm(acc, a, b, out_dtype=float32, out=acc)`` takes a float32
    ``acc`` with ``dtype`` factors (newer releases; older ones want ``acc`` in the factors' dtype).
    Checked once per process on 1 x 1 tensors."""
    one = torch.ones(1, 1, dtype=dtype, device="cuda")
    acc = torch.ones(1, 1, device="cuda")
    try:
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
    except RuntimeError:
        return False
    return acc.item() == 2.0


class OutputLayer:
    """``weight [V, D]`` in the GEMM operand dtype of ``gemms``, ``bias [V]`` in the compute dtype, softcap."""

    def __init__(self, weight: Tensor, bias: Tensor | None, softcap: float | None, gemms: Gemms):
        self.gemms = gemms
        self.weight = weight.detach().to(gemms.operand_dtype)
        self.bias = None if bias is None else bias.detach().to(compute_dtype(weight.dtype))
        self.softcap = softcap
        self.vocab_size = weight.shape[0]

    @property
    def kernel_softcap(self) -> float:
        """The softcap as the C++ and CUDA kernels take it: 0.0 for none."""
        return 0.0 if self.softcap is None else float(self.softcap)


def inverse_temperature(temperature: float | Tensor, rows: int, like: Tensor,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """``[rows]`` ``1 / temperature`` in ``dtype`` on ``like``'s device, contiguous, for the epilogue
    kernels (a tensor ``temperature`` has ``rows`` entries)."""
    if isinstance(temperature, Tensor):
        return (1.0 / temperature.to(dtype)).contiguous()
    return like.new_full((rows,), 1.0 / temperature, dtype=dtype)


@dataclass
class Chunk:
    """One token chunk: ``hidden [r, D]`` in the operand dtype, ``targets [r]`` int64, ``temperature``
    a float or ``[r]``; :meth:`of` zero-pads the rows to a multiple of ``align``, :meth:`head` drops
    the padding."""

    hidden: Tensor
    targets: Tensor
    temperature: float | Tensor

    @classmethod
    def of(cls, rows: TokenRows, r0: int, r1: int, dtype: torch.dtype, align: int) -> "Chunk":
        hidden = rows.hidden_rows(r0, r1).detach().to(dtype)
        targets = rows.targets[r0:r1]
        temperature = rows.temperature
        if isinstance(temperature, Tensor):
            temperature = temperature[r0:r1]
        pad = ceil_div(r1 - r0, align) * align - (r1 - r0)
        if pad:
            hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
            targets = torch.cat([targets, targets.new_zeros(pad)])
            if isinstance(temperature, Tensor):
                temperature = torch.cat([temperature, temperature.new_ones(pad)])
        return cls(hidden.contiguous(), targets, temperature)

    def head(self, r: int) -> "Chunk":
        temperature = self.temperature[:r] if isinstance(self.temperature, Tensor) else self.temperature
        return Chunk(self.hidden[:r], self.targets[:r], temperature)

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    def inverse_temperature(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[r]`` ``1 / temperature`` of the chunk's rows (see :func:`inverse_temperature`)."""
        return inverse_temperature(self.temperature, self.rows, self.hidden, dtype)


class Epilogue(Protocol):
    """What a backend supplies: the elementwise work on a float32 logits chunk ``[r, w]`` of columns
    ``v0:v0+w``, between the GEMMs."""

    def work_bytes(self, *, entropy: bool) -> int:
        """Bytes of work memory per chunk entry, the logits buffer included."""

    def logits(self, raw: Tensor, layer: OutputLayer, chunk: Chunk, v0: int) -> Tensor:
        """The chunk's logits as :meth:`block_stats` and :meth:`logit_grad` read them (the raw
        product, or transformed in place by bias, softcap and temperature)."""

    def block_stats(self, z: Tensor, layer: OutputLayer, chunk: Chunk, v0: int, partials: Tensor,
                    target_logit: Tensor, *, entropy: bool, mean: bool, square: bool) -> None:
        """Write ``partials [r, w / VOCAB_BLOCK, NUM_PARTIALS]`` of the chunk's blocks, and the target
        logit of rows whose target is in the chunk into ``target_logit [r]``; ``z`` is left unchanged."""

    def logit_grad(self, z: Tensor, layer: OutputLayer, chunk: Chunk, v0: int, stats: Tensor, coef: Tensor,
                   grad_dtype: torch.dtype, *, entropy: bool, mean: bool) -> Tensor:
        """The gradient on the pre-softcap logits, ``[r, w]`` in ``grad_dtype``, written over ``z``'s storage.

        ``coef [r, NUM_STATS]`` are the gradients on the statistics already divided by temperature:
        ``dz_j = p_j (c_lse - c_entropy (log p_j + entropy)) + c_mean / V + c_target [j == y]``,
        times ``1 - tanh^2`` under softcap."""


class ChunkKernels(Protocol):
    """What a backend supplies to the driver: for a padded token chunk and the vocabulary columns
    ``v0:v1`` (``v0`` a multiple of ``VOCAB_BLOCK``), its block statistics and its gradients.
    :class:`GemmEpilogue` builds it from the vendor GEMMs and an :class:`Epilogue`; the ``cpu``
    backend fuses both in C++ tiles."""

    def gemms(self, weight: Tensor) -> Gemms:
        """The GEMM dtype policy for ``weight`` (and hidden states of its dtype)."""

    def work_bytes(self, *, entropy: bool) -> int:
        """Bytes of work memory per chunk entry, the chunk buffer included."""

    def row_align(self, device: torch.device) -> int:
        """The multiple of rows that token chunks are padded to."""

    def block_stats(self, chunk: Chunk, layer: OutputLayer, v0: int, v1: int, buffer: Tensor, partials: Tensor,
                    target_logit: Tensor, *, keep_logits: bool, entropy: bool, mean: bool,
                    square: bool) -> Tensor | None:
        """Write ``partials [r, blocks, NUM_PARTIALS]`` of the columns' blocks and, for rows whose target
        lies there, ``target_logit [r]``; with ``keep_logits`` return the logits ``[r, v1 - v0]`` as
        :meth:`add_grads` reads them, in ``buffer`` (at least ``r * (v1 - v0)`` entries)."""

    def add_grads(self, grads: "GradAccumulator", chunk: Chunk, layer: OutputLayer, v0: int, v1: int,
                  buffer: Tensor, logits: Tensor | None, stats: Tensor, coef: Tensor, r0: int, *, entropy: bool,
                  mean: bool) -> None:
        """Accumulate the gradients of the chunk's first ``k = stats.shape[0]`` rows (rows ``r0:r0+k`` of
        the batch) for ``coef [k, NUM_STATS]`` (see :meth:`Epilogue.logit_grad`), from ``logits`` kept
        by :meth:`block_stats` (overwritten) or recomputed in ``buffer``."""


class GemmEpilogue:
    """:class:`ChunkKernels` from one vendor GEMM into the chunk buffer (the layer's :class:`Gemms`), an
    :class:`Epilogue` on the whole buffer, and the two gradient GEMMs."""

    def __init__(self, epilogue: Epilogue):
        self.epilogue = epilogue

    def gemms(self, weight: Tensor) -> Gemms:
        return Gemms(weight.dtype, weight.device)

    def work_bytes(self, *, entropy: bool) -> int:
        return self.epilogue.work_bytes(entropy=entropy)

    def row_align(self, device: torch.device) -> int:
        return row_align(device)

    def _logits(self, chunk: Chunk, layer: OutputLayer, v0: int, v1: int, buffer: Tensor) -> Tensor:
        raw = layer.gemms.logits(buffer[:chunk.rows * (v1 - v0)].view(chunk.rows, v1 - v0), chunk.hidden,
                                 layer.weight[v0:v1])
        return self.epilogue.logits(raw, layer, chunk, v0)

    def block_stats(self, chunk: Chunk, layer: OutputLayer, v0: int, v1: int, buffer: Tensor, partials: Tensor,
                    target_logit: Tensor, *, keep_logits: bool, entropy: bool, mean: bool,
                    square: bool) -> Tensor | None:
        z = self._logits(chunk, layer, v0, v1, buffer)
        self.epilogue.block_stats(z, layer, chunk, v0, partials, target_logit, entropy=entropy, mean=mean,
                                  square=square)
        return z if keep_logits else None

    def add_grads(self, grads: "GradAccumulator", chunk: Chunk, layer: OutputLayer, v0: int, v1: int,
                  buffer: Tensor, logits: Tensor | None, stats: Tensor, coef: Tensor, r0: int, *, entropy: bool,
                  mean: bool) -> None:
        rows = stats.shape[0]
        z = (self._logits(chunk, layer, v0, v1, buffer) if logits is None else logits)[:rows]
        real = chunk.head(rows)
        gemms = layer.gemms
        scale = gemms.grad_scale(coef)
        dz = self.epilogue.logit_grad(z, layer, real, v0, stats, coef * scale if scale != 1 else coef,
                                      gemms.grad_dtype, entropy=entropy, mean=mean)
        grads.add(gemms, real.hidden, dz, v0, r0, 1.0 / scale)


def merge_blocks(partials: Tensor, target_logit: Tensor, vocab_size: int, *, entropy: bool, mean: bool,
                 square: bool) -> Tensor:
    """``[r, num_blocks, NUM_PARTIALS]`` block partials -> ``[r, NUM_STATS]`` statistics, merged in block order."""
    block_max = partials[..., PARTIAL_MAX]
    block_sum = partials[..., PARTIAL_SUM]
    row_max = block_max.amax(1, keepdim=True)
    block_offset = block_max - row_max
    scale = block_offset.exp()
    total = (block_sum * scale).sum(1)
    stats = partials.new_zeros(partials.shape[0], NUM_STATS)
    stats[:, LSE] = row_max.squeeze(1) + total.log()
    stats[:, TARGET_LOGIT] = target_logit
    stats[:, MAX_LOGIT] = row_max.squeeze(1)
    if square:
        square_total = (partials[..., PARTIAL_SQUARE_SUM] * scale.square()).sum(1)
        stats[:, SQUARE_LSE] = 2 * row_max.squeeze(1) + square_total.log()
    if mean:
        stats[:, MEAN_LOGIT] = partials[..., PARTIAL_LOGIT_SUM].sum(1) / vocab_size
    if entropy:
        # sum_j p_j (z_j - max) from each block's sum of e^(z - m_b) (z - m_b), shifted to the row max
        shifted = (scale * (partials[..., PARTIAL_ENTROPY] + block_offset * block_sum)).sum(1) / total
        stats[:, ENTROPY] = total.log() - shifted
    return stats


def chunk_plan(kernels: "ChunkKernels", weight: Tensor, num_rows: int, *, entropy: bool, memory_budget: int | None,
               full_rows: bool, plan_vocab: int | None = None) -> ChunkPlan:
    """The chunk shape of ``kernels`` (their :meth:`ChunkKernels.gemms` already called for ``weight``):
    spanning the vocabulary when ``full_rows`` asks for it and enough such rows fit, else near square.

    ``plan_vocab``: the vocabulary size planned for (default ``weight``'s rows; at least that many): the
    ranks of a vocabulary-parallel call plan for their largest shard, so that all run the same token chunks."""
    budget = default_memory_budget(weight.device) if memory_budget is None else memory_budget
    shape = dict(entry_bytes=kernels.work_bytes(entropy=entropy), memory_budget=budget,
                 align=kernels.row_align(weight.device))
    vocab_size = weight.shape[0] if plan_vocab is None else plan_vocab
    plan = plan_chunks(num_rows, vocab_size, full_rows=full_rows, **shape)
    return plan if plan is not None else plan_chunks(num_rows, vocab_size, full_rows=False, **shape)


class _Driver:
    """One call's layer, GEMM policy, chunk kernels, chunk plan and chunk buffer."""

    def __init__(self, kernels: ChunkKernels, weight: Tensor, bias: Tensor | None, softcap: float | None,
                 num_rows: int, *, entropy: bool, memory_budget: int | None, full_rows: bool,
                 plan_vocab: int | None = None):
        self.kernels = kernels
        self.gemms = kernels.gemms(weight)
        self.layer = OutputLayer(weight, bias, softcap, self.gemms)
        self.dtype = compute_dtype(weight.dtype)
        self.align = kernels.row_align(weight.device)
        self.plan = chunk_plan(kernels, weight, num_rows, entropy=entropy, memory_budget=memory_budget,
                               full_rows=full_rows, plan_vocab=plan_vocab)
        self._buffer = torch.empty(self.plan.entries, dtype=self.dtype, device=weight.device)

    @property
    def full_rows(self) -> bool:
        return self.plan.vocab >= self.layer.vocab_size

    def chunk(self, rows: TokenRows, r0: int, r1: int) -> Chunk:
        return Chunk.of(rows, r0, r1, self.gemms.operand_dtype, self.align)

    def chunk_stats(self, chunk: Chunk, *, entropy: bool, mean: bool, square: bool = False
                    ) -> tuple[Tensor, Tensor | None]:
        """``[r, NUM_STATS]`` statistics of a (padded) token chunk, and its logits when they span the vocabulary."""
        vocab_size = self.layer.vocab_size
        partials = chunk.hidden.new_empty(chunk.rows, ceil_div(vocab_size, VOCAB_BLOCK), NUM_PARTIALS,
                                          dtype=self.dtype)
        target_logit = chunk.hidden.new_zeros(chunk.rows, dtype=self.dtype)
        z = None
        for v0, v1 in self.plan.vocab_ranges(vocab_size):
            blocks = partials[:, v0 // VOCAB_BLOCK:ceil_div(v1, VOCAB_BLOCK)]
            z = self.kernels.block_stats(chunk, self.layer, v0, v1, self._buffer, blocks, target_logit,
                                         keep_logits=self.full_rows, entropy=entropy, mean=mean, square=square)
        stats = merge_blocks(partials, target_logit, vocab_size, entropy=entropy, mean=mean, square=square)
        return stats, z

    def all_stats(self, rows: TokenRows, *, entropy: bool, mean: bool, square: bool = False) -> Tensor:
        """``[n, NUM_STATS]`` statistics of every row."""
        n = rows.num_rows
        stats = rows.hidden.new_empty(n, NUM_STATS, dtype=self.dtype)
        for r0, r1 in self.plan.row_ranges(n):
            stats[r0:r1] = self.chunk_stats(self.chunk(rows, r0, r1), entropy=entropy, mean=mean,
                                            square=square)[0][:r1 - r0]
        return stats

    def add_grads(self, grads: "GradAccumulator", chunk: Chunk, v0: int, v1: int, logits: Tensor | None,
                  stats: Tensor, coef: Tensor, r0: int, *, entropy: bool, mean: bool) -> None:
        """Gradients of the real rows of the padded ``chunk`` over columns ``v0:v1`` (see
        :meth:`ChunkKernels.add_grads`)."""
        self.kernels.add_grads(grads, chunk, self.layer, v0, v1, self._buffer, logits, stats, coef, r0,
                               entropy=entropy, mean=mean)

    def recompute_grads(self, grads: "GradAccumulator", rows: TokenRows, stats: Tensor, coef: Tensor, *,
                        entropy: bool, mean: bool) -> None:
        """Recompute every chunk's logits and accumulate the gradients for ``coef [n, NUM_STATS]``: one
        vocabulary range at a time over all token chunks, so that its weight and bias gradients are
        complete before the next range starts. The token chunks are prepared once for all ranges."""
        n = stats.shape[0]
        chunks = [(r0, r1, self.chunk(rows, r0, r1)) for r0, r1 in self.plan.row_ranges(n)]
        for v0, v1 in self.plan.vocab_ranges(self.layer.vocab_size):
            for r0, r1, padded in chunks:
                self.add_grads(grads, padded, v0, v1, None, stats[r0:r1], coef[r0:r1], r0, entropy=entropy,
                               mean=mean)


class GradAccumulator:
    """Gradients of hidden rows, weight and bias, accumulated in the compute dtype ``dtype``.

    The weight and bias gradients end in ``out_dtype`` (default ``dtype``). Where that differs, they
    are accumulated in the compute dtype over one vocabulary range (at most ``span`` columns) at a
    time, which the kernels complete before moving to the next (:meth:`columns`), and the range is
    then rounded into the result once: no compute-dtype copy of the whole ``[V, D]`` gradient.
    """

    def __init__(self, layer: OutputLayer, num_rows: int, dtype: torch.dtype, needs: tuple[bool, bool, bool], *,
                 out_dtype: torch.dtype | None = None, span: int | None = None):
        weight = layer.weight
        vocab_size, dim = weight.shape
        out_dtype = dtype if out_dtype is None else out_dtype
        self.layer = layer
        self.hidden = weight.new_zeros(num_rows, dim, dtype=dtype) if needs[0] else None
        self.weight = weight.new_zeros(vocab_size, dim, dtype=out_dtype) if needs[1] else None
        self.bias = weight.new_zeros(vocab_size, dtype=out_dtype) if needs[2] and layer.bias is not None else None
        windowed = out_dtype != dtype
        span = vocab_size if span is None else min(span, vocab_size)
        self._weight_window = weight.new_empty(span, dim, dtype=dtype) if windowed and needs[1] else None
        self._bias_window = weight.new_empty(span, dtype=dtype) if windowed and self.bias is not None else None
        self._range: tuple[int, int] | None = None  # the columns held in the windows

    def columns(self, v0: int, v1: int) -> tuple[Tensor | None, Tensor | None]:
        """The compute-dtype accumulators ``[v1 - v0, D]`` and ``[v1 - v0]`` of the weight and bias
        gradients of columns ``v0:v1`` (None where not needed). A windowed accumulator holds one range:
        asking for another one finishes the previous range."""
        if self._weight_window is None and self._bias_window is None:
            return (None if self.weight is None else self.weight[v0:v1],
                    None if self.bias is None else self.bias[v0:v1])
        if self._range != (v0, v1):
            self._flush()
            self._range = (v0, v1)
            for window in (self._weight_window, self._bias_window):
                if window is not None:
                    window[:v1 - v0].zero_()
        return (None if self._weight_window is None else self._weight_window[:v1 - v0],
                None if self._bias_window is None else self._bias_window[:v1 - v0])

    def _flush(self) -> None:
        if self._range is None:
            return
        v0, v1 = self._range
        for window, out in ((self._weight_window, self.weight), (self._bias_window, self.bias)):
            if window is not None:
                out[v0:v1].copy_(window[:v1 - v0])
        self._range = None

    def add(self, gemms: Gemms, chunk_hidden: Tensor, dz: Tensor, v0: int, r0: int, alpha: float) -> None:
        """Accumulate ``alpha * dz [r, w]`` of the token chunk starting at row ``r0`` and column ``v0``."""
        r, w = dz.shape
        if self.hidden is not None:
            gemms.accumulate(self.hidden[r0:r0 + r], dz, self.layer.weight[v0:v0 + w], alpha)
        weight, bias = self.columns(v0, v0 + w)
        if weight is not None:
            gemms.accumulate(weight, dz.t(), chunk_hidden, alpha)
        if bias is not None:
            bias.add_(dz.sum(0, dtype=bias.dtype), alpha=alpha)

    def grads(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(hidden, weight, bias)``: ``hidden`` in the compute dtype, the others in ``out_dtype``."""
        self._flush()
        return self.hidden, self.weight, self.bias


def per_row(temperature: float | Tensor) -> float | Tensor:
    """A float, or ``[r] -> [r, 1]`` to broadcast over a chunk's columns."""
    return temperature[:, None] if isinstance(temperature, Tensor) else temperature


def _cast(grads, dtypes) -> tuple:
    return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes))


def forward_stats(kernels: ChunkKernels, rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None,
                  *, entropy: bool, mean: bool, square: bool, memory_budget: int | None) -> Tensor:
    """``[n, NUM_STATS]`` statistics in the compute dtype, without autograd."""
    driver = _Driver(kernels, weight, bias, softcap, rows.num_rows, entropy=entropy, memory_budget=memory_budget,
                     full_rows=False)
    return driver.all_stats(rows, entropy=entropy, mean=mean, square=square)


def _check_backward_mode() -> None:
    """Gradients of the gradients are not formed: refuse ``create_graph=True`` rather than return a
    gradient that is silently off the graph."""
    if torch.is_grad_enabled():
        raise RuntimeError("double backward (create_graph=True) through the chunked backends is not supported: "
                           "their gradients are formed outside autograd; use backend='reference' to "
                           "differentiate the gradient")


def _check_no_transforms() -> None:
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError("the chunked backends do not support torch.func transforms (grad, vmap, jacrev, ...); "
                           "use torch.autograd, or backend='reference'")


class RowStatsFunction(torch.autograd.Function):
    """``(rows.hidden [N, D], weight [V, D], bias [V] | None) -> row statistics [n, NUM_STATS]`` of the
    computed rows; backward recomputes with fresh kernels, so no work buffer is kept from forward to backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, make_kernels: MakeKernels, rows: TokenRows, softcap, entropy: bool,
                mean: bool, square: bool, memory_budget):
        stats = forward_stats(make_kernels(), rows, weight, bias, softcap, entropy=entropy, mean=mean, square=square,
                              memory_budget=memory_budget)
        # targets and temperature may be the caller's tensors: saved, an in-place edit before backward raises;
        # saved tensors are freed once backward has run, while ctx (and so ctx.rows) lives as long as the graph
        temperature = rows.temperature if isinstance(rows.temperature, Tensor) else None
        ctx.save_for_backward(hidden, weight, bias, stats, rows.targets, temperature)
        ctx.rows = replace(rows, hidden=None, targets=None, temperature=None if temperature is not None
                           else rows.temperature)
        ctx.make_kernels, ctx.softcap, ctx.entropy, ctx.mean = make_kernels, softcap, entropy, mean
        ctx.memory_budget = memory_budget
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        _check_backward_mode()
        hidden, weight, bias, stats, targets, temperature = ctx.saved_tensors
        rows = replace(ctx.rows, hidden=hidden, targets=targets,
                       temperature=ctx.rows.temperature if temperature is None else temperature)
        grads = row_stats_grads(ctx.make_kernels, rows, weight, bias, ctx.softcap, stats, grad_stats,
                                entropy=ctx.entropy, mean=ctx.mean, memory_budget=ctx.memory_budget,
                                needs=ctx.needs_input_grad[:3])
        return (*grads, *[None] * 7)


def row_stats_grads(make_kernels: MakeKernels, rows: TokenRows, weight: Tensor, bias: Tensor | None,
                    softcap: float | None, stats: Tensor, grad_stats: Tensor, *, entropy: bool, mean: bool,
                    memory_budget: int | None, needs: tuple[bool, bool, bool]
                    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for ``(rows.hidden [N, D], weight, bias)`` (those ``needs`` asks for, in their dtypes) from
    the upstream gradient ``grad_stats [n, NUM_STATS]`` on the statistics ``stats [n, NUM_STATS]``,
    recomputing the logits. ``hidden``'s gradient is placed after the kernels' buffers are freed."""
    d_rows, d_weight, d_bias = _recomputed_grads(make_kernels(), rows, weight, bias, softcap, stats, grad_stats,
                                                 entropy=entropy, mean=mean, memory_budget=memory_budget, needs=needs)
    hidden = rows.hidden
    d_hidden = None if d_rows is None else hidden_grad(d_rows, rows.hidden_index, hidden.shape, hidden.dtype,
                                                       rows.hidden_grad_group)
    return d_hidden, d_weight, d_bias


def _recomputed_grads(kernels: ChunkKernels, rows: TokenRows, weight: Tensor, bias: Tensor | None,
                      softcap: float | None, stats: Tensor, grad_stats: Tensor, *, entropy: bool, mean: bool,
                      memory_budget: int | None, needs: tuple[bool, bool, bool]) -> tuple:
    """:func:`row_stats_grads` with the gradient of the computed rows ``[n, D]`` in the compute dtype."""
    hidden = rows.hidden
    driver = _Driver(kernels, weight, bias, softcap, rows.num_rows, entropy=entropy, memory_budget=memory_budget,
                     full_rows=False)
    coef = grad_stats.to(driver.dtype) / per_row(rows.temperature)
    entropy = entropy and bool(coef[:, ENTROPY].any())
    mean = mean and bool(coef[:, MEAN_LOGIT].any())
    grads = GradAccumulator(driver.layer, rows.num_rows, driver.dtype, needs, out_dtype=weight.dtype,
                            span=driver.plan.vocab)
    with torch.autocast(hidden.device.type, enabled=False):  # a backward inside the caller's autocast region
        driver.recompute_grads(grads, rows, stats, coef, entropy=entropy, mean=mean)
    d_rows, d_weight, d_bias = grads.grads()
    return d_rows, *_cast((d_weight, d_bias), (weight.dtype, weight.dtype))


class SummedLossFunction(torch.autograd.Function):
    """``(rows.hidden [N, D], weight, bias) -> (sum_i token_loss(stats)_i, stats [n, NUM_STATS])`` with the
    gradients formed during the forward pass, in token chunks that span the vocabulary (:func:`summed_loss`
    checks that they fit). The gradient of the computed rows is kept ``[n, D]`` in the compute dtype
    until backward, which places it in ``hidden``'s ``[N, D]`` gradient.

    ``token_loss(stats [r, NUM_STATS], r0, r1) -> [r]``: the (weighted) loss of rows ``r0:r1``; it may
    depend only on those rows' statistics and on values fixed before the call. The returned
    statistics are not differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, kernels: ChunkKernels, rows: TokenRows, softcap, token_loss: TokenLoss,
                entropy: bool, mean: bool, memory_budget, plan_vocab):
        n = rows.num_rows
        driver = _Driver(kernels, weight, bias, softcap, n, entropy=entropy, memory_budget=memory_budget,
                         full_rows=True, plan_vocab=plan_vocab)
        grads = GradAccumulator(driver.layer, n, driver.dtype, ctx.needs_input_grad[:3])
        stats = hidden.new_empty(n, NUM_STATS, dtype=driver.dtype)
        loss = hidden.new_zeros((), dtype=driver.dtype)
        for r0, r1 in driver.plan.row_ranges(n):
            padded = driver.chunk(rows, r0, r1)
            chunk_stats, z = driver.chunk_stats(padded, entropy=entropy, mean=mean)
            stats[r0:r1] = chunk_stats = chunk_stats[:r1 - r0]
            chunk_loss, coef = stat_grads(lambda s, r0=r0, r1=r1: token_loss(s, r0, r1), chunk_stats)
            loss += chunk_loss
            temperature = padded.head(r1 - r0).temperature
            driver.add_grads(grads, padded, 0, driver.layer.vocab_size, z, chunk_stats, coef / per_row(temperature),
                             r0, entropy=entropy, mean=mean)
        # kept in the compute dtype so that scaling by the upstream gradient rounds only once
        saved = grads.grads()
        ctx.save_for_backward(*(torch.empty(0) if g is None else g for g in saved))
        ctx.has_grad = tuple(g is not None for g in saved)
        ctx.hidden_index, ctx.hidden_shape, ctx.hidden_dtype = rows.hidden_index, hidden.shape, hidden.dtype
        ctx.hidden_grad_group = rows.hidden_grad_group
        ctx.dtypes = (weight.dtype, weight.dtype)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        _check_backward_mode()
        # an unscaled float32 gradient is handed over as is, and autograd can adopt it without a copy (one
        # that is summed over ranks is a fresh product: the saved one may be differentiated again)
        unit = bool(grad_loss == 1)
        d_rows, d_weight, d_bias = [(g if unit else g * grad_loss.to(g.dtype)) if has else None
                                    for g, has in zip(ctx.saved_tensors, ctx.has_grad)]
        group = ctx.hidden_grad_group
        if d_rows is not None and unit and group is not None:
            d_rows = d_rows.clone()
        d_hidden = None if d_rows is None else hidden_grad(d_rows, ctx.hidden_index, ctx.hidden_shape,
                                                           ctx.hidden_dtype, group)
        return (d_hidden, *_cast((d_weight, d_bias), ctx.dtypes), *[None] * 8)


def row_stats(make_kernels: MakeKernels, rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None, *,
              entropy: bool, mean: bool, square: bool, memory_budget: int | None) -> Tensor:
    """``[n, NUM_STATS]`` statistics of ``rows`` (see :mod:`osft_kernels.row_stats`), differentiable in
    the first four columns."""
    _check_no_transforms()
    return RowStatsFunction.apply(rows.hidden, weight, bias, make_kernels, rows, softcap, entropy, mean, square,
                                  memory_budget)


def summed_loss(make_kernels: MakeKernels, rows: TokenRows, weight: Tensor, bias: Tensor | None,
                softcap: float | None, token_loss: TokenLoss, *, entropy: bool, mean: bool,
                memory_budget: int | None, plan_vocab: int | None = None) -> tuple[Tensor, Tensor]:
    """``(sum_i token_loss_i, stats [n, NUM_STATS])``, the loss differentiable with gradients formed in forward.

    ``plan_vocab`` (see :func:`chunk_plan`) also decides the strategy: ranks that plan for the same
    vocabulary size call ``token_loss`` on the same row ranges."""
    _check_no_transforms()
    kernels = make_kernels()
    kernels.gemms(weight)
    plan_vocab = weight.shape[0] if plan_vocab is None else plan_vocab
    plan = chunk_plan(kernels, weight, rows.num_rows, entropy=entropy, memory_budget=memory_budget,
                      full_rows=True, plan_vocab=plan_vocab)
    if plan.vocab < plan_vocab:  # too few full rows fit: statistics, then a recomputing backward
        stats = row_stats(make_kernels, rows, weight, bias, softcap, entropy=entropy, mean=mean, square=False,
                          memory_budget=memory_budget)
        return token_loss(stats, 0, rows.num_rows).sum(), stats.detach()
    return SummedLossFunction.apply(rows.hidden, weight, bias, kernels, rows, softcap, token_loss, entropy, mean,
                                    memory_budget, plan_vocab)


class ChunkedBackend:
    """A chunked backend's entry points (``row_stats``, ``summed_loss``, ``row_stats_grads``, see
    :mod:`osft_kernels.backends`): the functions above with fresh kernels from ``make_kernels()`` per
    pass (their work buffers live for one forward or backward), after ``check(hidden)`` refuses inputs
    the backend cannot run."""

    def __init__(self, make_kernels: MakeKernels,
                 check: Callable[[Tensor], None] = lambda hidden: None):
        self.make_kernels = make_kernels
        self.check = check

    def row_stats(self, rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None, *,
                  entropy: bool, mean: bool, square: bool, options) -> Tensor:
        """Differentiable ``[n, NUM_STATS]`` statistics of ``rows`` (see :mod:`osft_kernels.row_stats`)."""
        self.check(rows.hidden)
        return row_stats(self.make_kernels, rows, weight, bias, softcap, entropy=entropy, mean=mean, square=square,
                         memory_budget=options.memory_budget)

    def summed_loss(self, rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None,
                    token_loss: TokenLoss, *, entropy: bool, mean: bool, options) -> tuple[Tensor, Tensor]:
        """``(sum_i token_loss_i, stats [n, NUM_STATS])`` with the gradients formed in forward."""
        self.check(rows.hidden)
        return summed_loss(self.make_kernels, rows, weight, bias, softcap, token_loss, entropy=entropy, mean=mean,
                           memory_budget=options.memory_budget, plan_vocab=options.plan_vocab)

    def backend(self, name: str) -> Backend:
        """These entry points under ``name``, as the ops call them."""
        return Backend(name, self.row_stats, self.row_stats_grads, self.summed_loss)

    def row_stats_grads(self, rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None,
                        stats: Tensor, grad_stats: Tensor, *, entropy: bool, mean: bool, options,
                        needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Gradients for ``(rows.hidden, weight, bias)`` from ``grad_stats [n, NUM_STATS]``."""
        self.check(rows.hidden)
        return row_stats_grads(self.make_kernels, rows, weight, bias, softcap, stats, grad_stats, entropy=entropy,
                               mean=mean, memory_budget=options.memory_budget, needs=needs)
