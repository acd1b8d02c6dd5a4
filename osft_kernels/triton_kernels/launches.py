"""The launch of every kernel, built in one place: the backend runs it, and the ahead-of-time compile
check (``tools/triton_compile_check.py``) compiles exactly what it would run, from the same arguments
on meta tensors.
"""
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ..driver import NUM_PARTIALS, VOCAB_BLOCK, ceil_div
from ..row_stats import NUM_STATS
from . import configs
from .epilogue import block_stats_kernel, logit_grad_kernel
from .forward import merge_partials_kernel, row_partials_kernel

MERGE_BLOCK = 128
_POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64"}


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the grid, the runtime arguments by name (tensors and scalars), the
    compile-time constants, and the launch options."""

    kernel: triton.JITFunction
    grid: tuple[int, ...]
    args: dict[str, Tensor | int | float]
    constexprs: dict[str, int | bool | str]
    num_warps: int
    num_stages: int

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)

    def signature(self) -> dict[str, str]:
        """The Triton type of each runtime argument (tensors by dtype, ints as i32, floats as fp32), as
        ahead-of-time compilation takes them."""
        def type_of(value) -> str:
            if isinstance(value, Tensor):
                return _POINTER_TYPES[value.dtype]
            return "fp32" if isinstance(value, float) else "i32"
        return {name: type_of(value) for name, value in self.args.items()}


def _softcap(softcap: float | None) -> float:
    return 1.0 if softcap is None else float(softcap)


def block_stats(z: Tensor, partials: Tensor, target_logit: Tensor, targets: Tensor, inv_temp: Tensor,
                bias: Tensor | None, softcap: float | None, v0: int, *, entropy: bool, mean: bool, square: bool,
                config: configs.EpilogueConfig | None = None) -> Launch:
    """:func:`block_stats_kernel` over the logits chunk ``z [r, w]`` of columns ``v0:v0+w`` (see its docstring)."""
    r, w = z.shape
    config = config or (configs.SQUARE_STATS_EPILOGUE if square else configs.STATS_EPILOGUE)
    return Launch(
        block_stats_kernel, (ceil_div(r, config.rows), ceil_div(w, VOCAB_BLOCK)),
        dict(logits_ptr=z, stride_l=z.stride(0), bias_ptr=z if bias is None else bias, targets_ptr=targets,
             inv_temp_ptr=inv_temp, partials_ptr=partials, stride_p=partials.stride(0), target_logit_ptr=target_logit,
             R=r, W=w, v0=v0, softcap=_softcap(softcap)),
        dict(BLOCK=VOCAB_BLOCK, TILE=config.tile, ROWS=config.rows, HAS_BIAS=bias is not None,
             HAS_SOFTCAP=softcap is not None, MEAN=mean, ENTROPY=entropy, SQUARE=square, PARTIALS=NUM_PARTIALS),
        num_warps=config.warps, num_stages=3)


def logit_grad(z: Tensor, dz: Tensor, targets: Tensor, inv_temp: Tensor, stats: Tensor, coef: Tensor,
               bias: Tensor | None, softcap: float | None, v0: int, vocab_size: int, *, entropy: bool, mean: bool,
               config: configs.EpilogueConfig = configs.GRAD_EPILOGUE) -> Launch:
    """:func:`logit_grad_kernel` from the logits chunk ``z [r, w]`` into ``dz [r, w]`` (which may alias it)."""
    r, w = z.shape
    return Launch(
        logit_grad_kernel, (ceil_div(r, config.rows),),
        dict(logits_ptr=z, stride_l=z.stride(0), dz_ptr=dz, stride_dz=dz.stride(0),
             bias_ptr=z if bias is None else bias, targets_ptr=targets, inv_temp_ptr=inv_temp, stats_ptr=stats,
             coef_ptr=coef, R=r, W=w, v0=v0, V=vocab_size, softcap=_softcap(softcap)),
        dict(TILE=config.tile, ROWS=config.rows, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
             MEAN=mean, ENTROPY=entropy, STATS=NUM_STATS),
        num_warps=config.warps, num_stages=3)


def row_partials(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, inv_temp: Tensor,
                 stats: Tensor, partials: Tensor, softcap: float | None, *, entropy: bool, mean: bool, square: bool,
                 config: triton.Config, input_precision: str) -> Launch:
    """:func:`row_partials_kernel`, the fused forward's logits tiles: ``hidden [n, D]``, ``weight [V, D]``
    (unit column stride), partials of ``CHUNK_COLUMNS``-column chunks into ``partials``."""
    n, d = hidden.shape
    v = weight.shape[0]
    return Launch(
        row_partials_kernel, (ceil_div(n, config.kwargs["BLOCK_N"]) * ceil_div(v, configs.CHUNK_COLUMNS),),
        dict(hidden_ptr=hidden, weight_ptr=weight, bias_ptr=bias if bias is not None else stats, targets_ptr=targets,
             inv_temp_ptr=inv_temp, stats_ptr=stats, partials_ptr=partials, N=n, D=d, V=v,
             stride_hn=hidden.stride(0), stride_wv=weight.stride(0), softcap=_softcap(softcap)),
        dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, MEAN=mean, ENTROPY=entropy, SQUARE=square,
             STATS=NUM_STATS, PARTIALS=NUM_PARTIALS, UPCAST=configs.INTERPRETING, INPUT_PRECISION=input_precision,
             **config.kwargs),
        num_warps=config.num_warps, num_stages=config.num_stages)


def merge_partials(partials: Tensor, stats: Tensor, vocab_size: int, *, entropy: bool, mean: bool,
                   square: bool) -> Launch:
    """:func:`merge_partials_kernel`: the fused forward's chunk partials into ``stats [n, NUM_STATS]``."""
    n = stats.shape[0]
    return Launch(
        merge_partials_kernel, (ceil_div(n, MERGE_BLOCK),),
        dict(partials_ptr=partials, stats_ptr=stats, N=n, V=vocab_size,
             num_chunks=ceil_div(vocab_size, configs.CHUNK_COLUMNS)),
        dict(BLOCK=MERGE_BLOCK, MEAN=mean, ENTROPY=entropy, SQUARE=square, STATS=NUM_STATS, PARTIALS=NUM_PARTIALS),
        num_warps=4, num_stages=1)
