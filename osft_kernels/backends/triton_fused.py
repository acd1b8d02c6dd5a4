"""Triton backend: fused forward and backward kernels, for CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``, which is how it is tested without a GPU).

Forward: 2NDV FLOPs, ``O(N)`` outputs (``osft_kernels.triton_kernels.forward``). Backward recomputes
the logits tile by tile and accumulates float32 ``d_hidden [N, D]``, ``d_weight [V, D]`` and
``d_bias [V]``, rounded once to the input dtype at the end: 6NDV with float atomics, or 8NDV with
``deterministic=True`` (``osft_kernels.triton_kernels.backward``). Half-precision inputs stay
half precision as tensor-core operands; float32 inputs use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is set.

Options: ``filter_eps`` (``"auto"``: ``finfo(dtype).eps / 32``, 2^-12 for bfloat16; 0 disables)
skips backward tiles whose gradient is negligible, see the backward module for the bound;
``deterministic`` makes gradients bitwise reproducible.
"""
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..inputs import BackendOptions, TokenRows
from ..row_stats import NUM_STATS
from ..triton_kernels import configs
from ..triton_kernels.backward import FUSED, OWN_COLS, OWN_ROWS, logit_grad_kernel
from ..triton_kernels.forward import NUM_PARTIALS, merge_partials_kernel, row_partials_kernel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MERGE_BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not configs.INTERPRETING and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def resolve_filter_eps(filter_eps, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 32 if filter_eps == "auto" else float(filter_eps)


def _row_major(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _Head:
    """Kernel arguments shared by forward and backward."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: TokenRows, softcap):
        self.hidden, self.weight = _row_major(hidden), _row_major(weight)
        self.n, self.d = hidden.shape
        self.v = weight.shape[0]
        self.bias = bias
        self.targets = rows.targets.contiguous()
        temperature = rows.temperature
        self.inv_temp = (1.0 / temperature.float() if isinstance(temperature, Tensor)
                         else hidden.new_full((self.n,), 1.0 / temperature, dtype=torch.float32)).contiguous()
        self.softcap = 1.0 if softcap is None else float(softcap)
        self.constants = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                              UPCAST=configs.INTERPRETING, INPUT_PRECISION=_input_precision(hidden.dtype))

    def dummy(self) -> Tensor:
        return self.hidden.new_zeros(1, dtype=torch.float32)

    def bias_arg(self) -> Tensor:
        return self.bias if self.bias is not None else self.dummy()


def forward_grid(n: int, v: int, meta: dict) -> tuple[int]:
    """One program per (row tile, vocabulary chunk), on grid axis 0 (limit 2^31 - 1)."""
    return (_cdiv(n, meta["BLOCK_N"]) * _cdiv(v, configs.CHUNK_COLUMNS),)


def backward_grid(mode: int, n: int, v: int, meta: dict) -> tuple[int]:
    """FUSED: one program per (row tile, column tile); OWN_ROWS: per row tile; OWN_COLS: per column tile."""
    row_tiles, col_tiles = _cdiv(n, meta["BLOCK_N"]), _cdiv(v, meta["BLOCK_V"])
    return ({FUSED: row_tiles * col_tiles, OWN_ROWS: row_tiles, OWN_COLS: col_tiles}[mode],)


def forward_stats(head: _Head, *, mean: bool, entropy: bool, deterministic: bool) -> Tensor:
    """``[n, 4]`` float32 row statistics."""
    stats = head.hidden.new_zeros(head.n, NUM_STATS, dtype=torch.float32)
    if head.n == 0:
        return stats
    num_chunks = _cdiv(head.v, configs.CHUNK_COLUMNS)
    partials = head.hidden.new_empty(num_chunks * NUM_PARTIALS * head.n, dtype=torch.float32)
    args = (head.hidden, head.weight, head.bias_arg(), head.targets, head.inv_temp, stats, partials,
            head.n, head.d, head.v, head.hidden.stride(0), head.weight.stride(0), head.softcap)
    configs.launch(row_partials_kernel, configs.row_partials_autotuned,
                   lambda meta: forward_grid(head.n, head.v, meta), args,
                   dict(head.constants, MEAN=mean, ENTROPY=entropy),
                   config=configs.fixed_forward_config(head.hidden.device) if deterministic else None)
    merge_partials_kernel[(_cdiv(head.n, MERGE_BLOCK),)](partials, stats, head.n, head.v, num_chunks,
                                                         BLOCK=MERGE_BLOCK, MEAN=mean, ENTROPY=entropy)
    return stats


def backward_grads(head: _Head, stats: Tensor, grad_stats: Tensor, needs: tuple[bool, bool, bool], *,
                   mean: bool, entropy: bool, filter_eps: float, deterministic: bool):
    """Float32 ``(d_hidden [n, D] | None, d_weight [V, D] | None, d_bias [V] | None)``."""
    needs_bias = needs[2] and head.bias is not None
    d_hidden = head.hidden.new_zeros(head.n, head.d, dtype=torch.float32) if needs[0] else None
    d_weight = head.hidden.new_zeros(head.v, head.d, dtype=torch.float32) if needs[1] else None
    d_bias = head.hidden.new_zeros(head.v, dtype=torch.float32) if needs_bias else None
    if head.n == 0 or not any((needs[0], needs[1], needs_bias)):
        return d_hidden, d_weight, d_bias
    coef = (grad_stats.float() * head.inv_temp[:, None]).contiguous()
    args = (head.hidden, head.weight, head.bias_arg(), head.targets, head.inv_temp, stats, coef,
            head.dummy() if d_hidden is None else d_hidden, head.dummy() if d_weight is None else d_weight,
            head.dummy() if d_bias is None else d_bias,
            head.n, head.d, head.v, head.hidden.stride(0), head.weight.stride(0), head.softcap, filter_eps)
    constants = dict(head.constants, MEAN=mean, ENTROPY=entropy, FILTER=filter_eps > 0)

    def run(mode, hidden_grad, weight_grad, bias_grad):
        configs.launch(logit_grad_kernel, configs.logit_grad_autotuned,
                       lambda meta: backward_grid(mode, head.n, head.v, meta), args,
                       dict(constants, MODE=mode, HIDDEN_GRAD=hidden_grad, WEIGHT_GRAD=weight_grad,
                            BIAS_GRAD=bias_grad),
                       config=configs.fixed_backward_config(head.hidden.device) if deterministic else None)

    if not deterministic:
        run(FUSED, needs[0], needs[1], needs_bias)
        return d_hidden, d_weight, d_bias
    if needs[0]:
        run(OWN_ROWS, True, False, False)
    if needs[1] or needs_bias:
        run(OWN_COLS, False, needs[1], needs_bias)
    return d_hidden, d_weight, d_bias


class TritonRowStatsFunction(torch.autograd.Function):
    """``(hidden [n, D], weight [V, D], bias [V] | None) -> row statistics [n, 4]`` float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows: TokenRows, softcap, entropy: bool, mean: bool,
                options: BackendOptions):
        stats = forward_stats(_Head(hidden, weight, bias, rows, softcap), mean=mean, entropy=entropy,
                              deterministic=options.deterministic)
        ctx.rows, ctx.softcap, ctx.entropy, ctx.mean, ctx.options = rows, softcap, entropy, mean, options
        ctx.save_for_backward(hidden, weight, bias, stats)
        return stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_stats):
        hidden, weight, bias, stats = ctx.saved_tensors
        options = ctx.options
        grads = backward_grads(_Head(hidden, weight, bias, ctx.rows, ctx.softcap), stats, grad_stats,
                               ctx.needs_input_grad[:3], mean=ctx.mean, entropy=ctx.entropy,
                               deterministic=options.deterministic,
                               filter_eps=resolve_filter_eps(options.filter_eps, hidden.dtype))
        dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        cast = tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes))
        return (*cast, None, None, None, None, None)


def row_stats(rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None, *,
              entropy: bool, mean: bool, options: BackendOptions) -> Tensor:
    """Differentiable ``[n, 4]`` statistics of ``rows`` (see :mod:`osft_kernels.row_stats`)."""
    check_inputs(rows.hidden)
    return TritonRowStatsFunction.apply(rows.hidden, weight, bias, rows, softcap, entropy, mean, options)
