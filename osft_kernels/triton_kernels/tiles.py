"""Tile-level building blocks shared by the forward and backward kernels.

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
    """``tanh`` from ``tl.exp`` (libdevice is not available in the interpreter)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
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
