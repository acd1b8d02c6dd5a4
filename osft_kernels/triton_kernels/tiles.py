"""Tile-level building blocks of the fused forward kernel (and ``tanh``, shared with the epilogues).

A tile is ``BLOCK_N`` token rows by ``BLOCK_V`` vocabulary columns. Its logits are one ``tl.dot``
per ``BLOCK_D`` slice of the hidden size (fp32 accumulation), followed by the epilogue in registers:
bias, softcap, then the per-row ``1 / temperature``. Every row or column offset is widened to int64
before it is multiplied by a stride, so ``N * D`` and ``V * D`` may exceed 2^31 elements.

``UPCAST`` converts operands to float32 right after loading. The Triton interpreter needs it
(its raw bfloat16 arithmetic is wrong); compiled GPU code keeps half-precision operands for the
tensor cores.
"""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """``tanh`` from ``tl.exp`` (libdevice is not available in the interpreter), within a few float32
    ulps everywhere: its odd Taylor series through ``x^9`` below ``|x| = 0.3`` (where ``1 - e^(-2|x|)``
    would cancel), ``(1 - e) / (1 + e)`` with ``e = e^(-2|x|)`` above."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.3, small, large)
    return tl.where(x < 0, -t, t)


@triton.jit
def load_operand(ptrs, mask, UPCAST: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, inv_temp, D, stride_hn,
                stride_wv, softcap, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """``z = softcap(hidden[rows] @ weight[cols].T + bias[cols]) * inv_temp``: ``[BLOCK_N, BLOCK_V]`` float32.

    Masked rows read zeros; masked columns hold finite garbage that callers mask.
    """
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        h = load_operand(h_ptrs + dd[None, :], row_mask[:, None] & d_mask[None, :], UPCAST)
        w = load_operand(w_ptrs + dd[None, :], col_mask[:, None] & d_mask[None, :], UPCAST)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc * inv_temp[:, None]


LARGE_NEGATIVE = tl.constexpr(-3.0e38)  # initial running max: finite, so that 0 * (m_old - m_new) stays 0


@triton.jit
def online_softmax_init(ROWS: tl.constexpr):
    """The empty state of :func:`online_softmax_step` for ``ROWS`` rows: ``m`` (finite), ``l``, ``s``,
    ``sum z``, ``q`` and the target logit, each ``[ROWS]`` float32."""
    zero = tl.zeros((ROWS,), tl.float32)
    return tl.full((ROWS,), LARGE_NEGATIVE, tl.float32), zero, zero, zero, zero, zero


@triton.jit
def online_softmax_step(z, cols, col_mask, target, m, l, s, z_sum, q, target_logit, MEAN: tl.constexpr,
                        ENTROPY: tl.constexpr, SQUARE: tl.constexpr):
    """Fold a ``[ROWS, TILE]`` tile of logits ``z`` (columns ``cols``, valid where ``col_mask``) into
    each row's running max ``m``, ``l = sum e^(z-m)``, ``s = sum e^(z-m) (z-m)`` (entropy), ``sum z``
    (mean logit), ``q = sum e^(2(z-m))`` (sum of squared probabilities) and target logit. Returns the
    six updated ``[ROWS]`` values."""
    target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), 1)
    if MEAN:
        z_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), 1)
    z = tl.where(col_mask[None, :], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, 1))
    shift = m - m_new
    alpha = tl.exp(shift)
    z_shifted = z - m_new[:, None]
    e = tl.exp(z_shifted)
    if ENTROPY:
        # e == 0 where z is -inf (masked columns, -inf bias): those add nothing, not 0 * inf
        s = alpha * (s + shift * l) + tl.sum(e * tl.where(e > 0, z_shifted, 0.0), 1)
    if SQUARE:
        q = alpha * alpha * q + tl.sum(e * e, 1)
    l = alpha * l + tl.sum(e, 1)
    return m_new, l, s, z_sum, q, target_logit
