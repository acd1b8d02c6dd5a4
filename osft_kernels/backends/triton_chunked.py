"""Triton backend, the default for CUDA tensors: the chunked driver with Triton epilogue kernels, and
a fused Triton forward for statistics in no memory. CPU tensors run under ``TRITON_INTERPRET=1``,
which is how it is tested without a GPU.

Chunked driver (:mod:`osft_kernels.driver`): cuBLAS computes each logits chunk in float32 from
half-precision operands; :mod:`osft_kernels.triton_kernels.epilogue` reduces it to block statistics
and writes the logit gradient in the input dtype over the chunk's own buffer; cuBLAS forms
``d_hidden`` and ``d_weight`` in float32. Deterministic: no atomics.

Fused forward (:mod:`osft_kernels.triton_kernels.forward`), for ``memory_budget=0`` without
gradients: one kernel computes logits tiles with ``tl.dot`` and reduces them in registers, so no
logits reach memory; a second merges per-chunk partials. It needs no buffer but is slower than the
driver (on an H200 at 16384 x 4096 x 128256 in bfloat16: 1.8x the logits GEMM against 1.2x).
float32 inputs use tensor cores: 3xTF32 (``tf32x3``, about float32 accuracy) under
``torch.get_float32_matmul_precision() == "highest"`` (the default), TF32 otherwise.
"""
import torch
from torch import Tensor

from .. import driver
from ..backend import Backend
from ..driver import NUM_PARTIALS, VOCAB_BLOCK, Chunk, OutputLayer, ceil_div, inverse_temperature
from ..inputs import BackendOptions, TokenRows, wants_grad
from ..row_stats import NUM_STATS
from ..triton_kernels import configs
from ..triton_kernels.epilogue import block_stats_kernel, logit_grad_kernel
from ..triton_kernels.forward import merge_partials_kernel, row_partials_kernel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MERGE_BLOCK = 128


def check_inputs(hidden: Tensor) -> None:
    """Float32/bfloat16/float16 CUDA tensors (of compute capability >= 8.0), or CPU tensors when the
    interpreter is on; ``weight`` was checked to match ``hidden``'s dtype and device."""
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' supports float32, bfloat16 and float16 inputs, got {hidden.dtype}; "
                        f"use backend='torch' for float64")
    if configs.INTERPRETING:
        if hidden.device.type != "cpu":
            raise ValueError(f"with TRITON_INTERPRET=1 the triton backend needs CPU tensors, got {hidden.device}")
    elif hidden.device.type != "cuda":
        raise ValueError(f"backend='triton' needs CUDA tensors, got {hidden.device} "
                         f"(set TRITON_INTERPRET=1 to run the kernels on CPU tensors for testing)")
    if hidden.device.type == "cuda":
        configs.device_arch(hidden.device)


def launch_block_stats(z: Tensor, partials: Tensor, target_logit: Tensor, targets: Tensor, inv_temp: Tensor,
                       bias: Tensor | None, softcap: float | None, v0: int, *, entropy: bool, mean: bool, square: bool,
                       config: configs.EpilogueConfig | None = None) -> None:
    """:func:`block_stats_kernel` over the logits chunk ``z [r, w]`` of columns ``v0:v0+w`` (see its docstring)."""
    r, w = z.shape
    if r == 0:
        return
    config = config or (configs.SQUARE_STATS_EPILOGUE if square else configs.STATS_EPILOGUE)
    block_stats_kernel[(ceil_div(r, config.rows), ceil_div(w, VOCAB_BLOCK))](
        z, z.stride(0), z if bias is None else bias, targets, inv_temp, partials, partials.stride(0), target_logit,
        r, w, v0, 1.0 if softcap is None else float(softcap), BLOCK=VOCAB_BLOCK, TILE=config.tile, ROWS=config.rows,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, MEAN=mean, ENTROPY=entropy, SQUARE=square,
        PARTIALS=NUM_PARTIALS, num_warps=config.warps)


def launch_logit_grad(z: Tensor, dz: Tensor, targets: Tensor, inv_temp: Tensor, stats: Tensor, coef: Tensor,
                      bias: Tensor | None, softcap: float | None, v0: int, vocab_size: int, *, entropy: bool,
                      mean: bool, config: configs.EpilogueConfig = configs.GRAD_EPILOGUE) -> None:
    """:func:`logit_grad_kernel` from the logits chunk ``z [r, w]`` into ``dz [r, w]`` (which may alias it)."""
    r, w = z.shape
    if r == 0:
        return
    logit_grad_kernel[(ceil_div(r, config.rows),)](
        z, z.stride(0), dz, dz.stride(0), z if bias is None else bias, targets, inv_temp, stats, coef, r, w, v0,
        vocab_size, 1.0 if softcap is None else float(softcap), TILE=config.tile, ROWS=config.rows,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, MEAN=mean, ENTROPY=entropy, STATS=NUM_STATS,
        num_warps=config.warps)


class TritonEpilogue:
    """The :class:`osft_kernels.driver.Epilogue` as two Triton kernels; the logits buffer is the only
    work memory (the gradient is written over it)."""

    def work_bytes(self, *, entropy: bool) -> int:
        return 4

    def logits(self, raw: Tensor, layer: OutputLayer, chunk: Chunk, v0: int) -> Tensor:
        return raw  # bias, softcap and temperature are applied by the kernels as they read

    def block_stats(self, z: Tensor, layer: OutputLayer, chunk: Chunk, v0: int, partials: Tensor,
                    target_logit: Tensor, *, entropy: bool, mean: bool, square: bool) -> None:
        launch_block_stats(z, partials, target_logit, chunk.targets, chunk.inverse_temperature(),
                           layer.bias, layer.softcap, v0, entropy=entropy, mean=mean, square=square)

    def logit_grad(self, z: Tensor, layer: OutputLayer, chunk: Chunk, v0: int, stats: Tensor, coef: Tensor,
                   grad_dtype: torch.dtype, *, entropy: bool, mean: bool) -> Tensor:
        # the gradient row is written over the first bytes of its own logits row
        dz = z.view(grad_dtype)[:, :z.shape[1]] if grad_dtype != z.dtype else z
        launch_logit_grad(z, dz, chunk.targets, chunk.inverse_temperature(),
                          stats.float().contiguous(), coef.float().contiguous(), layer.bias, layer.softcap, v0,
                          layer.vocab_size, entropy=entropy, mean=mean)
        return dz


def fused_forward_stats(rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None, *,
                        entropy: bool, mean: bool, square: bool) -> Tensor:
    """``[n, NUM_STATS]`` float32 statistics from the fused forward kernels (no logits in memory, no autograd)."""
    hidden = rows.hidden_rows()
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    stats = hidden.new_zeros(n, NUM_STATS, dtype=torch.float32)
    if n == 0:
        return stats
    num_chunks = ceil_div(v, configs.CHUNK_COLUMNS)
    partials = hidden.new_empty(num_chunks * NUM_PARTIALS * n, dtype=torch.float32)
    config = configs.forward_config(hidden.device, hidden.dtype)
    grid = (ceil_div(n, config.kwargs["BLOCK_N"]) * num_chunks,)
    row_partials_kernel[grid](
        hidden, weight, bias if bias is not None else stats, rows.targets.contiguous(),
        inverse_temperature(rows.temperature, n, hidden), stats, partials, n, d, v, hidden.stride(0), weight.stride(0),
        1.0 if softcap is None else float(softcap), HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        MEAN=mean, ENTROPY=entropy, SQUARE=square, STATS=NUM_STATS, PARTIALS=NUM_PARTIALS, UPCAST=configs.INTERPRETING,
        INPUT_PRECISION=configs.input_precision(hidden.dtype),
        **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    merge_partials_kernel[(ceil_div(n, MERGE_BLOCK),)](partials, stats, n, v, num_chunks, BLOCK=MERGE_BLOCK,
                                                       MEAN=mean, ENTROPY=entropy, SQUARE=square, STATS=NUM_STATS,
                                                       PARTIALS=NUM_PARTIALS)
    return stats


CHUNKED = driver.ChunkedBackend(lambda: driver.GemmEpilogue(TritonEpilogue()), check_inputs)


def row_stats(rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None, *,
              entropy: bool, mean: bool, square: bool, options: BackendOptions) -> Tensor:
    """``[n, NUM_STATS]`` statistics of ``rows`` (see :mod:`osft_kernels.row_stats`) through the chunked
    driver, differentiable; with ``memory_budget=0`` and no gradient wanted, from the fused forward."""
    check_inputs(rows.hidden)
    if options.memory_budget == 0 and not wants_grad(rows.hidden, weight, bias):
        return fused_forward_stats(rows, weight, bias, softcap, entropy=entropy, mean=mean, square=square)
    return driver.row_stats(CHUNKED.make_kernels, rows, weight, bias, softcap, entropy=entropy, mean=mean,
                            square=square, memory_budget=options.memory_budget)


BACKEND = Backend("triton", row_stats, CHUNKED.row_stats_grads, CHUNKED.summed_loss)
