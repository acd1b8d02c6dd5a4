"""The fused ops as ``torch.library`` custom ops, so that ``torch.compile(fullgraph=True)`` traces them.

The eager ops read tensor values (target checks, dropping ignored tokens, chunk loops), which a
compiler cannot trace. Under ``torch.compile`` :func:`osft_kernels.linear_logprobs` and
:func:`osft_kernels.linear_cross_entropy` call these ops instead: each runs the eager implementation,
checks included, on real tensors, and tells the compiler only its output shapes.

* ``osft_kernels::row_stats``: the statistics of :mod:`osft_kernels.row_stats` on the grid of
  (shifted) targets, ``[*target_shape, NUM_STATS]``, 0 at ignored positions; its backward is the op
  ``osft_kernels::row_stats_backward``, which recomputes the logits (8NDV in all). The token-level
  formulas are applied to the statistics in traced PyTorch, outside the ops.
"""
import torch
from torch import Tensor

from . import token_rows
from .backend import BackendOptions
from .backends import resolve_backend
from .row_stats import NUM_STATS


def _rows(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, temperature: Tensor | None,
          temperature_value: float, softcap: float | None, ignore_index: int, shift: bool):
    """``(rows, weight, bias)``: the checked :class:`~osft_kernels.token_rows.TokenRows` of the op's inputs, and
    the output layer, all detached (autograd is the ops' registered backward)."""
    hidden, weight, bias, temperature = (None if t is None else t.detach() for t in (hidden, weight, bias, temperature))
    temperature = temperature_value if temperature is None else temperature
    rows = token_rows.prepare_rows(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift)
    return rows, weight, bias


def _or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    """Custom ops return tensors: an empty one stands for a gradient that was not asked for."""
    return like.new_empty(0) if grad is None else grad


@torch.library.custom_op("osft_kernels::row_stats", mutates_args=())
def row_stats(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, temperature: Tensor | None,
              temperature_value: float, softcap: float | None, ignore_index: int, shift: bool, entropy: bool,
              mean: bool, square: bool, backend: str, memory_budget: int | None) -> Tensor:
    """``[*target_shape, NUM_STATS]`` statistics in the compute dtype, 0 at ignored positions."""
    rows, weight, bias = _rows(hidden, weight, targets, bias, temperature, temperature_value, softcap, ignore_index,
                               shift)
    with torch.no_grad():
        stats = resolve_backend(backend, hidden.device).row_stats(
            rows, weight, bias, softcap, entropy=entropy, mean=mean, square=square,
            options=BackendOptions(memory_budget))
    return rows.scatter(stats)


@row_stats.register_fake
def _row_stats_fake(hidden, weight, targets, bias, temperature, temperature_value, softcap, ignore_index, shift,
                    entropy, mean, square, backend, memory_budget):
    return hidden.new_empty((*token_rows.target_shape(targets, shift), NUM_STATS),
                            dtype=token_rows.compute_dtype(hidden.dtype))


@torch.library.custom_op("osft_kernels::row_stats_backward", mutates_args=())
def row_stats_backward(grad_stats: Tensor, stats: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor,
                       bias: Tensor | None, temperature: Tensor | None, temperature_value: float,
                       softcap: float | None, ignore_index: int, shift: bool, entropy: bool, mean: bool, square: bool,
                       backend: str, memory_budget: int | None, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for ``(hidden, weight, bias)`` from ``grad_stats`` on :func:`row_stats`' output (empty
    where ``needs`` is False)."""
    rows, weight, bias = _rows(hidden, weight, targets, bias, temperature, temperature_value, softcap, ignore_index,
                               shift)
    d_hidden, d_weight, d_bias = resolve_backend(backend, hidden.device).row_stats_grads(
        rows, weight, bias, softcap, rows.gather(stats), rows.gather(grad_stats), entropy=entropy, mean=mean,
        options=BackendOptions(memory_budget), needs=tuple(needs))
    d_hidden = None if d_hidden is None else d_hidden.view(hidden.shape)
    return _or_empty(d_hidden, hidden), _or_empty(d_weight, weight), _or_empty(d_bias, weight)


@row_stats_backward.register_fake
def _row_stats_backward_fake(grad_stats, stats, hidden, weight, targets, bias, temperature, temperature_value, softcap,
                             ignore_index, shift, entropy, mean, square, backend, memory_budget, needs):
    return (torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
            torch.empty_like(weight) if needs[1] else weight.new_empty(0),
            torch.empty_like(bias) if needs[2] else weight.new_empty(0))


def _row_stats_setup(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, *options = inputs
    ctx.save_for_backward(hidden, weight, targets, bias, temperature, output)
    ctx.options = options


def _row_stats_grad(ctx, grad_stats):
    hidden, weight, targets, bias, temperature, stats = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]]
    grads = torch.ops.osft_kernels.row_stats_backward(grad_stats, stats, hidden, weight, targets, bias, temperature,
                                                      *ctx.options, needs)
    d_hidden, d_weight, d_bias = (g if need else None for g, need in zip(grads, needs))
    return d_hidden, d_weight, None, d_bias, *[None] * 10


row_stats.register_autograd(_row_stats_grad, setup_context=_row_stats_setup)
