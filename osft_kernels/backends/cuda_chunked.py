"""CUDA backend: the chunked driver (:mod:`osft_kernels.driver`) with cuBLAS GEMMs and the CUDA C++
epilogue of ``csrc/cuda`` (torch ops ``osft_kernels_cuda::block_stats`` and ``logit_grad``).

The same work as the triton backend's chunked driver, without triton: cuBLAS computes each logits
chunk in float32 (from half-precision operands for half-precision inputs); one kernel reduces it to
per-block statistics, another writes the logit gradient in the input dtype over the chunk's own
buffer; cuBLAS forms ``d_hidden`` and ``d_weight`` in float32. Deterministic: no atomics. The
per-logit math is ``csrc/common/row_math.h``, shared with the cpu backend.

The extension ``osft_kernels/_cuda*.so`` is built by ``setup.py`` when torch is a CUDA build and
nvcc is found (``make cuda-build`` on a machine without a GPU).
"""
import functools

import torch
from torch import Tensor

from .. import driver
from ..driver import NUM_PARTIALS, VOCAB_BLOCK, Chunk, OutputLayer
from ..row_stats import NUM_STATS
from .libraries import library_path

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BUILD_HINT = ("build it next to a CUDA build of torch with nvcc on PATH: pip install --no-build-isolation -e . "
              "(or make cuda-build)")


@functools.cache
def extension() -> str:
    """Why the CUDA extension's ops cannot be used ("" once they are loaded)."""
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is not a CUDA build"
    path = library_path("_cuda")
    if path is None:
        return f"osft_kernels was installed without its CUDA extension; {BUILD_HINT}"
    try:
        torch.ops.load_library(str(path))
    except OSError as error:
        return f"the CUDA extension {path.name} failed to load ({error}); {BUILD_HINT}"
    layout = tuple(int(x) for x in torch.ops.osft_kernels_cuda.build_info().split())
    if layout != (VOCAB_BLOCK, NUM_STATS, NUM_PARTIALS):
        return f"the CUDA extension {path.name} is stale (layout {layout}); {BUILD_HINT}"
    return ""


def available() -> bool:
    return not extension()


def check_inputs(hidden: Tensor) -> None:
    """float32/bfloat16/float16 CUDA tensors and a loaded extension; ``weight`` was checked to match
    ``hidden``'s dtype and device."""
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='cuda' supports float32, bfloat16 and float16 inputs, got {hidden.dtype}; "
                        f"use backend='torch' for float64")
    if hidden.device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got {hidden.device} tensors")
    if not available():
        raise ValueError(f"backend 'cuda' is not available: {extension()}")


class CudaEpilogue:
    """The :class:`osft_kernels.driver.Epilogue` as two CUDA kernels; the logits buffer is the only
    work memory (the gradient is written over it)."""

    def work_bytes(self, *, entropy: bool) -> int:
        return 4

    def logits(self, raw: Tensor, layer: OutputLayer, chunk: Chunk, v0: int) -> Tensor:
        return raw  # bias, softcap and temperature are applied by the kernels as they read

    def block_stats(self, z: Tensor, layer: OutputLayer, chunk: Chunk, v0: int, partials: Tensor,
                    target_logit: Tensor, *, entropy: bool, mean: bool, square: bool) -> None:
        torch.ops.osft_kernels_cuda.block_stats(z, partials, target_logit, chunk.targets.contiguous(),
                                                chunk.inverse_temperature(), layer.bias,
                                                layer.kernel_softcap, v0, entropy, mean, square)

    def logit_grad(self, z: Tensor, layer: OutputLayer, chunk: Chunk, v0: int, stats: Tensor, coef: Tensor,
                   grad_dtype: torch.dtype, *, entropy: bool, mean: bool) -> Tensor:
        # the gradient row is written over the first bytes of its own logits row
        dz = z.view(grad_dtype)[:, :z.shape[1]] if grad_dtype != z.dtype else z
        torch.ops.osft_kernels_cuda.logit_grad(z, dz, chunk.targets.contiguous(),
                                               chunk.inverse_temperature(),
                                               stats.float().contiguous(), coef.float().contiguous(), layer.bias,
                                               layer.kernel_softcap, v0, layer.vocab_size, entropy, mean)
        return dz


BACKEND = driver.ChunkedBackend(lambda: driver.GemmEpilogue(CudaEpilogue()), check_inputs).backend("cuda")
