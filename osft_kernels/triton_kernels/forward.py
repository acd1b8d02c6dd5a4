"""Forward: the ``[n, STATS]`` row statistics (:mod:`osft_kernels.row_stats`) in two kernels.

``row_partials_kernel`` runs one program per (row tile, vocabulary chunk) pair. A chunk is
``CHUNK_TILES`` consecutive ``BLOCK_V`` tiles; the program walks them in order with an online
softmax and writes five partials per row and chunk: the running max ``m``, ``l = sum e^(z-m)``,
``s = sum e^(z-m) (z-m)`` (entropy), ``sum z`` (mean logit) and ``sum e^(2(z-m))``; the program
whose chunk holds a row's target writes the target logit. Splitting the vocabulary into chunks keeps the GPU full when
there are few row tiles. ``merge_partials_kernel`` then folds the chunks of each row in chunk order.

Chunk boundaries depend only on the kernel config (keyed on D and V), never on N, and every
reduction runs in a fixed order, so a row's statistics do not depend on the other rows in the batch.
Only ``O(n * V / chunk)`` values reach global memory.
"""
import triton
import triton.language as tl

from . import layout
from .tiles import logits_tile, online_softmax_init, online_softmax_step


@triton.jit(do_not_specialize=["N"])
def row_partials_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, inv_temp_ptr, stats_ptr, partials_ptr,
                        N, D, V, stride_hn, stride_wv, softcap,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        CHUNK_TILES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        MEAN: tl.constexpr, ENTROPY: tl.constexpr, SQUARE: tl.constexpr, STATS: tl.constexpr,
                        PARTIALS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """partials: ``[num_chunks, PARTIALS, N]`` float32; stats: ``[N, STATS]`` float32 (target column written here)."""
    num_row_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    row_tile = pid % num_row_tiles
    chunk = pid // num_row_tiles
    rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    inv_temp = tl.load(inv_temp_ptr + rows, mask=row_mask, other=1.0)
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

    m, l, s, z_sum, q, target_logit = online_softmax_init(BLOCK_N)
    first_tile = chunk * CHUNK_TILES
    last_tile = tl.minimum(first_tile + CHUNK_TILES, tl.cdiv(V, BLOCK_V))
    for tile in range(first_tile, last_tile):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, inv_temp, D,
                        stride_hn, stride_wv, softcap, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP,
                        UPCAST, INPUT_PRECISION)
        m, l, s, z_sum, q, target_logit = online_softmax_step(z, cols, col_mask, target, m, l, s, z_sum, q,
                                                              target_logit, MEAN, ENTROPY, SQUARE)

    out = partials_ptr + chunk.to(tl.int64) * PARTIALS * N + rows
    tl.store(out + layout.PARTIAL_MAX * N, m, mask=row_mask)
    tl.store(out + layout.PARTIAL_SUM * N, l, mask=row_mask)
    tl.store(out + layout.PARTIAL_ENTROPY * N, s, mask=row_mask)
    tl.store(out + layout.PARTIAL_LOGIT_SUM * N, z_sum, mask=row_mask)
    tl.store(out + layout.PARTIAL_SQUARE_SUM * N, q, mask=row_mask)
    in_chunk = (target >= first_tile * BLOCK_V) & (target < last_tile * BLOCK_V)
    tl.store(stats_ptr + rows.to(tl.int64) * STATS + layout.TARGET_LOGIT, target_logit, mask=row_mask & in_chunk)


@triton.jit(do_not_specialize=["N"])
def merge_partials_kernel(partials_ptr, stats_ptr, N, V, num_chunks, BLOCK: tl.constexpr, MEAN: tl.constexpr,
                          ENTROPY: tl.constexpr, SQUARE: tl.constexpr, STATS: tl.constexpr, PARTIALS: tl.constexpr):
    """Fold ``[num_chunks, PARTIALS, N]`` partials into stats columns lse, mean logit, entropy, max logit and
    square lse (columns as in :mod:`osft_kernels.row_stats`), in chunk order."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < N
    m, l, s, z_sum, q, _ = online_softmax_init(BLOCK)
    chunk_stride = N.to(tl.int64) * PARTIALS
    for chunk in range(num_chunks):
        src = partials_ptr + chunk * chunk_stride + rows
        m_c = tl.load(src + layout.PARTIAL_MAX * N, mask=row_mask, other=0.0)
        l_c = tl.load(src + layout.PARTIAL_SUM * N, mask=row_mask, other=1.0)
        s_c = tl.load(src + layout.PARTIAL_ENTROPY * N, mask=row_mask, other=0.0)
        m_new = tl.maximum(m, m_c)
        shift, shift_c = m - m_new, m_c - m_new
        alpha, alpha_c = tl.exp(shift), tl.exp(shift_c)
        s = alpha * (s + shift * l) + alpha_c * (s_c + shift_c * l_c)
        l = alpha * l + alpha_c * l_c
        if SQUARE:
            q = alpha * alpha * q + alpha_c * alpha_c * tl.load(src + layout.PARTIAL_SQUARE_SUM * N, mask=row_mask,
                                                                other=0.0)
        m = m_new
        z_sum += tl.load(src + layout.PARTIAL_LOGIT_SUM * N, mask=row_mask, other=0.0)
    out = stats_ptr + rows.to(tl.int64) * STATS
    log_l = tl.log(l)
    tl.store(out + layout.LSE, m + log_l, mask=row_mask)
    if MEAN:
        tl.store(out + layout.MEAN_LOGIT, z_sum / V, mask=row_mask)
    if ENTROPY:
        tl.store(out + layout.ENTROPY_STAT, log_l - s / l, mask=row_mask)
    tl.store(out + layout.MAX_LOGIT, m, mask=row_mask)
    if SQUARE:
        tl.store(out + layout.SQUARE_LSE, 2 * m + tl.log(q), mask=row_mask)
