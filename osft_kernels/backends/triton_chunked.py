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
from ..backend import Backend, BackendOptions
from ..driver import NUM_PARTIALS, Chunk, OutputLayer, ceil_div, inverse_temperature
from ..row_stats import NUM_STATS
from ..token_rows import TokenRows, wants_grad
from ..triton_kernels import configs, launches

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    """Run :func:`launches.block_stats` (nothing for an empty chunk)."""
    if z.shape[0]:
        launches.block_stats(z, partials, target_logit, targets, inv_temp, bias, softcap, v0, entropy=entropy,
                             mean=mean, square=square, config=config)()


def launch_logit_grad(z: Tensor, dz: Tensor, targets: Tensor, inv_temp: Tensor, stats: Tensor, coef: Tensor,
                      bias: Tensor | None, softcap: float | None, v0: int, vocab_size: int, *, entropy: bool,
                      mean: bool, config: configs.EpilogueConfig = configs.GRAD_EPILOGUE) -> None:
    """Run :func:`launches.logit_grad` (nothing for an empty chunk)."""
    if z.shape[0]:
        launches.logit_grad(z, dz, targets, inv_temp, stats, coef, bias, softcap, v0, vocab_size, entropy=entropy,
                            mean=mean, config=config)()


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
    n = hidden.shape[0]
    v = weight.shape[0]
    stats = hidden.new_zeros(n, NUM_STATS, dtype=torch.float32)
    if n == 0:
        return stats
    partials = hidden.new_empty(ceil_div(v, configs.CHUNK_COLUMNS) * NUM_PARTIALS * n, dtype=torch.float32)
    flags = dict(entropy=entropy, mean=mean, square=square)
    inv_temp = inverse_temperature(rows.temperature, n, hidden)
    launches.row_partials(hidden, weight, bias, rows.targets.contiguous(), inv_temp, stats, partials, softcap, **flags,
                          config=configs.forward_config(hidden.device, hidden.dtype),
                          input_precision=configs.input_precision(hidden.dtype))()
    launches.merge_partials(partials, stats, v, **flags)()
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
