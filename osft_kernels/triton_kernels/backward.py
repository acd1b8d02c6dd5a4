"""Backward: gradients of hidden, weight and bias from upstream gradients on the row statistics.

Each ``[BLOCK_N, BLOCK_V]`` logits tile is recomputed from ``hidden`` and ``weight`` and turned into
the logit gradient in registers (:func:`logit_grad_tile`); then ``d_hidden[rows] += dz @ W[cols]``
and ``d_weight[cols] += dz^T @ H[rows]`` (and ``d_bias``) are accumulated in float32, one
``BLOCK_D`` slice at a time. No ``[N, V]`` tensor is stored.

One kernel, three schedules (``MODE``):

* ``FUSED``: one program per (row tile, column tile); both products per tile, added with float
  atomics. 2NDV to recompute + 4NDV of products. Fastest, but the order of the additions varies
  from run to run.
* ``OWN_ROWS`` / ``OWN_COLS`` (``deterministic=True``): a program owns a row tile of ``d_hidden``
  and walks every column tile in order (or owns a column tile of ``d_weight``/``d_bias`` and walks
  every row tile), adding with plain loads and stores. Two launches, 2 x (2NDV + 2NDV): bitwise
  reproducible.

Gradient filtering (``FILTER``): a tile whose rows all satisfy
``sum_j |dz_ij| <= filter_eps * scale_i * width / V`` is skipped, where ``width`` is the tile's
column count and ``scale_i = |c_lse| + |c_target| + |c_mean| + |c_entropy|`` bounds the row's total
``sum_j |dz_ij|`` for the logprob, cross-entropy and label-smoothing terms. The skipped tiles of a
row thus carry at most ``filter_eps * scale_i`` of its gradient mass, whatever the vocabulary size.
"""
import triton
import triton.language as tl

from .tiles import load_operand, logits_tile

FUSED, OWN_ROWS, OWN_COLS = 0, 1, 2


@triton.jit
def logit_grad_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, inv_temp, target, lse,
                    entropy, c_lse, c_target, c_mean, c_entropy, D, V, stride_hn, stride_wv, softcap,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, MEAN: tl.constexpr, ENTROPY: tl.constexpr, UPCAST: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """Gradient on the pre-softcap logits, ``[BLOCK_N, BLOCK_V]`` float32, zero outside the masks.

    ``c_*`` are the upstream gradients of the row statistics already multiplied by ``inv_temp``:
    ``dz_j = p_j (c_lse - c_entropy (log p_j + entropy)) + c_mean / V + c_target [j == y]``, then
    the softcap factor ``1 - tanh^2``.
    """
    z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, inv_temp, D, stride_hn,
                    stride_wv, softcap, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, UPCAST, INPUT_PRECISION)
    log_p = z - lse[:, None]
    coef = c_lse[:, None]
    if ENTROPY:
        coef = coef - c_entropy[:, None] * (log_p + entropy[:, None])
    dz = tl.exp(log_p) * coef
    if MEAN:
        dz += (c_mean / V)[:, None]
    dz += tl.where(cols[None, :] == target[:, None], c_target[:, None], 0.0)
    if HAS_SOFTCAP:
        t = z / (inv_temp[:, None] * softcap)
        dz = dz * (1.0 - t * t)
    return tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)


@triton.jit
def accumulate(ptrs, value, mask, ATOMIC: tl.constexpr):
    """``*ptrs += value`` in float32: an atomic add, or a plain read-modify-write by the owning program."""
    if ATOMIC:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask) + value, mask=mask)


@triton.jit
def add_tile_grads(dz, hidden_ptr, weight_ptr, d_hidden_ptr, d_weight_ptr, d_bias_ptr, rows, cols, row_mask,
                   col_mask, D, stride_hn, stride_wv, BLOCK_D: tl.constexpr, HIDDEN_GRAD: tl.constexpr,
                   WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, ATOMIC: tl.constexpr,
                   UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``d_hidden[rows] += dz @ W[cols]``, ``d_weight[cols] += dz^T @ H[rows]``, ``d_bias[cols] += sum_i dz``.

    The float32 accumulators are ``[N, D]``, ``[V, D]`` and ``[V]``, contiguous.
    """
    if UPCAST:
        dz_op = dz
    else:
        dz_op = dz.to(hidden_ptr.dtype.element_ty)  # tensor-core operand
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    if BIAS_GRAD:
        accumulate(d_bias_ptr + cols, tl.sum(dz, 0), col_mask, ATOMIC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        if HIDDEN_GRAD:
            w = load_operand(weight_ptr + cols64[:, None] * stride_wv + dd[None, :],
                             col_mask[:, None] & d_mask[None, :], UPCAST)
            accumulate(d_hidden_ptr + rows64[:, None] * D + dd[None, :],
                       tl.dot(dz_op, w, input_precision=INPUT_PRECISION), row_mask[:, None] & d_mask[None, :], ATOMIC)
        if WEIGHT_GRAD:
            h = load_operand(hidden_ptr + rows64[:, None] * stride_hn + dd[None, :],
                             row_mask[:, None] & d_mask[None, :], UPCAST)
            accumulate(d_weight_ptr + cols64[:, None] * D + dd[None, :],
                       tl.dot(tl.trans(dz_op), h, input_precision=INPUT_PRECISION), col_mask[:, None] & d_mask[None, :],
                       ATOMIC)
    if not ATOMIC:
        tl.debug_barrier()  # the next tile reads what this one stored


@triton.jit(do_not_specialize=["N"])
def logit_grad_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, inv_temp_ptr, stats_ptr, coef_ptr,
                      d_hidden_ptr, d_weight_ptr, d_bias_ptr, N, D, V, stride_hn, stride_wv, softcap, filter_eps,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MEAN: tl.constexpr,
                      ENTROPY: tl.constexpr, FILTER: tl.constexpr, HIDDEN_GRAD: tl.constexpr,
                      WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, UPCAST: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr):
    """stats, coef: ``[N, 4]`` float32 (coef = upstream gradient of the stats times ``inv_temp``)."""
    num_row_tiles = tl.cdiv(N, BLOCK_N)
    num_col_tiles = tl.cdiv(V, BLOCK_V)
    pid = tl.program_id(0)
    if MODE == 0:  # FUSED
        first_row_tile, last_row_tile = pid % num_row_tiles, pid % num_row_tiles + 1
        first_col_tile, last_col_tile = pid // num_row_tiles, pid // num_row_tiles + 1
    elif MODE == 1:  # OWN_ROWS
        first_row_tile, last_row_tile = pid, pid + 1
        first_col_tile, last_col_tile = 0, num_col_tiles
    else:  # OWN_COLS
        first_row_tile, last_row_tile = 0, num_row_tiles
        first_col_tile, last_col_tile = pid, pid + 1

    for row_tile in range(first_row_tile, last_row_tile):
        rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        row_stats = stats_ptr + rows.to(tl.int64) * 4
        row_coef = coef_ptr + rows.to(tl.int64) * 4
        inv_temp = tl.load(inv_temp_ptr + rows, mask=row_mask, other=1.0)
        target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(row_stats, mask=row_mask, other=0.0)
        entropy = tl.load(row_stats + 3, mask=row_mask, other=0.0)
        c_lse = tl.load(row_coef, mask=row_mask, other=0.0)
        c_target = tl.load(row_coef + 1, mask=row_mask, other=0.0)
        c_mean = tl.load(row_coef + 2, mask=row_mask, other=0.0)
        c_entropy = tl.load(row_coef + 3, mask=row_mask, other=0.0)
        budget = filter_eps * (tl.abs(c_lse) + tl.abs(c_target) + tl.abs(c_mean) + tl.abs(c_entropy)) / V
        for col_tile in range(first_col_tile, last_col_tile):
            cols = col_tile * BLOCK_V + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            dz = logit_grad_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, inv_temp,
                                 target, lse, entropy, c_lse, c_target, c_mean, c_entropy, D, V, stride_hn,
                                 stride_wv, softcap, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, MEAN,
                                 ENTROPY, UPCAST, INPUT_PRECISION)
            keep = True
            if FILTER:
                width = tl.minimum(V - col_tile * BLOCK_V, BLOCK_V).to(tl.float32)
                keep = tl.max(tl.sum(tl.abs(dz), 1) - budget * width, 0) > 0
            if keep:
                add_tile_grads(dz, hidden_ptr, weight_ptr, d_hidden_ptr, d_weight_ptr, d_bias_ptr, rows, cols,
                               row_mask, col_mask, D, stride_hn, stride_wv, BLOCK_D, HIDDEN_GRAD, WEIGHT_GRAD,
                               BIAS_GRAD, MODE == 0, UPCAST, INPUT_PRECISION)
