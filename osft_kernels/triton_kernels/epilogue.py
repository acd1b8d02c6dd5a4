"""The chunked driver's epilogue on the GPU: two memory-bound kernels over a float32 logits chunk.

The chunk ``[R, W]`` (row stride ``stride_l``) is the raw product ``hidden @ weight[v0:v0+W]^T`` from
cuBLAS; both kernels apply bias, softcap and ``1 / temperature`` as they read it. A program handles
``ROWS`` rows at a time, ``TILE`` columns per step.

* :func:`block_stats_kernel`: one program per (row group, ``BLOCK``-column block): an online softmax
  over the block's tiles in order, writing the block's partials (max, sum of exp, the entropy sum,
  the logit sum, the sum of squared exps) and the target logit. Its order of operations is fixed by
  the constexprs.
* :func:`logit_grad_kernel`: one program per row group, walking the rows' tiles in order and writing
  the logit gradient in the gradient dtype. The output may alias the input: row i's half-precision
  gradient is written over the first half of its own float32 logits, which only overwrites columns
  already read. Those were read by any of the program's warps, so a barrier between each tile's
  loads and its stores keeps every warp's reads ahead of every warp's writes.
"""
import triton
import triton.language as tl

from . import layout
from .tiles import online_softmax_init, online_softmax_step, tanh


@triton.jit
def transformed_logits(raw, cols, col_mask, bias_ptr, v0, inv_temp, softcap, HAS_BIAS: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr):
    """``z = softcap(raw + bias) * inv_temp`` and ``t = tanh((raw + bias) / softcap)`` (1 without softcap);
    ``raw [ROWS, TILE]``, ``cols [TILE]``, ``inv_temp [ROWS]``."""
    s = raw
    if HAS_BIAS:
        s += tl.load(bias_ptr + v0 + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    t = tl.full(s.shape, 1.0, tl.float32)
    if HAS_SOFTCAP:
        t = tanh(s / softcap)
        s = softcap * t
    return s * inv_temp[:, None], t


@triton.jit(do_not_specialize=["R", "W", "v0"])
def block_stats_kernel(logits_ptr, stride_l, bias_ptr, targets_ptr, inv_temp_ptr, partials_ptr, stride_p,
                       target_logit_ptr, R, W, v0, softcap, BLOCK: tl.constexpr, TILE: tl.constexpr,
                       ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MEAN: tl.constexpr,
                       ENTROPY: tl.constexpr, SQUARE: tl.constexpr, PARTIALS: tl.constexpr):
    """partials: ``[R, W / BLOCK, PARTIALS]`` float32 (row stride ``stride_p``); target_logit: ``[R]``."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < R
    block = tl.program_id(1)
    inv_temp = tl.load(inv_temp_ptr + rows, mask=row_mask, other=1.0)
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1) - v0
    m, l, s, z_sum, q, target_logit = online_softmax_init(ROWS)
    for c0 in range(block * BLOCK, block * BLOCK + BLOCK, TILE):
        cols = c0 + tl.arange(0, TILE)
        col_mask = cols < W
        mask = row_mask[:, None] & col_mask[None, :]
        raw = tl.load(logits_ptr + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)
        z, _ = transformed_logits(raw, cols, col_mask, bias_ptr, v0, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
        m, l, s, z_sum, q, target_logit = online_softmax_step(z, cols, col_mask, target, m, l, s, z_sum, q,
                                                              target_logit, MEAN, ENTROPY, SQUARE)
    out = partials_ptr + rows * stride_p + block * PARTIALS
    tl.store(out + layout.PARTIAL_MAX, m, mask=row_mask)
    tl.store(out + layout.PARTIAL_SUM, l, mask=row_mask)
    tl.store(out + layout.PARTIAL_ENTROPY, s, mask=row_mask)
    tl.store(out + layout.PARTIAL_LOGIT_SUM, z_sum, mask=row_mask)
    tl.store(out + layout.PARTIAL_SQUARE_SUM, q, mask=row_mask)
    in_block = (target >= block * BLOCK) & (target < tl.minimum(block * BLOCK + BLOCK, W))
    tl.store(target_logit_ptr + rows, target_logit, mask=row_mask & in_block)


@triton.jit(do_not_specialize=["R", "W", "v0"])
def logit_grad_kernel(logits_ptr, stride_l, dz_ptr, stride_dz, bias_ptr, targets_ptr, inv_temp_ptr, stats_ptr,
                      coef_ptr, R, W, v0, V, softcap, TILE: tl.constexpr, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, MEAN: tl.constexpr, ENTROPY: tl.constexpr, STATS: tl.constexpr):
    """dz ``[R, W]`` (row stride ``stride_dz``, its pointer's dtype) from the logits; stats, coef: ``[R, STATS]``
    float32 (columns as in :mod:`osft_kernels.row_stats`).

    ``coef`` holds the upstream gradients of (lse, target logit, mean logit, entropy) times ``inv_temp``.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < R
    inv_temp = tl.load(inv_temp_ptr + rows, mask=row_mask, other=1.0)
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1) - v0
    lse = tl.load(stats_ptr + rows * STATS + layout.LSE, mask=row_mask, other=0.0)[:, None]
    entropy = tl.load(stats_ptr + rows * STATS + layout.ENTROPY_STAT, mask=row_mask, other=0.0)[:, None]
    c_lse = tl.load(coef_ptr + rows * STATS + layout.LSE, mask=row_mask, other=0.0)[:, None]
    c_target = tl.load(coef_ptr + rows * STATS + layout.TARGET_LOGIT, mask=row_mask, other=0.0)[:, None]
    c_mean = tl.load(coef_ptr + rows * STATS + layout.MEAN_LOGIT, mask=row_mask, other=0.0)[:, None]
    c_entropy = tl.load(coef_ptr + rows * STATS + layout.ENTROPY_STAT, mask=row_mask, other=0.0)[:, None]
    for c0 in range(0, W, TILE):
        cols = c0 + tl.arange(0, TILE)
        col_mask = cols < W
        mask = row_mask[:, None] & col_mask[None, :]
        raw = tl.load(logits_ptr + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)
        z, t = transformed_logits(raw, cols, col_mask, bias_ptr, v0, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
        log_p = z - lse
        coef = c_lse
        if ENTROPY:
            coef = coef - c_entropy * (log_p + entropy)
        p = tl.exp(log_p)
        dz = tl.where(p > 0, p * coef, 0.0)  # p == 0 at -inf logits, where coef may be infinite
        if MEAN:
            dz += c_mean / V
        dz += tl.where(cols[None, :] == target[:, None], c_target, 0.0)
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)
        tl.debug_barrier()  # every warp has read this tile (and the earlier ones) before any overwrites them
        tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
