"""Reference backend: materializes the ``[n, V]`` logits in the compute dtype and lets autograd
differentiate them. Ground truth for the chunked backends and fine for tiny inputs; memory O(n V)."""
from dataclasses import replace

import torch
from torch import Tensor

from ..backend import Backend, BackendOptions
from ..driver import LOG_ZERO
from ..token_rows import TokenRows, compute_dtype
from ..vocab_parallel import SumOverRanksInBackward


def row_stats(rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None, *,
              entropy: bool, mean: bool, square: bool, options: BackendOptions) -> Tensor:
    """``[n, NUM_STATS]`` statistics (see :mod:`osft_kernels.row_stats`), differentiable; ``options`` are unused."""
    dtype = compute_dtype(weight.dtype)
    hidden = rows.hidden_rows().to(dtype)
    if rows.hidden_grad_group is not None:
        hidden = SumOverRanksInBackward.apply(hidden, rows.hidden_grad_group)
    logits = torch.nn.functional.linear(hidden, weight.to(dtype),
                                        None if bias is None else bias.to(dtype))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    temperature = rows.temperature
    logits = logits / (temperature[:, None] if isinstance(temperature, Tensor) else temperature)
    lse = torch.logsumexp(logits, dim=-1)
    zero = torch.zeros_like(lse)
    return torch.stack([
        lse,
        _target_logit(logits, rows.targets),
        logits.mean(dim=-1) if mean else zero,
        _entropy(logits) if entropy else zero,
        logits.detach().amax(dim=-1),
        torch.logsumexp(2 * logits.detach(), dim=-1) if square else zero,
    ], dim=1)


def row_stats_grads(rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None, stats: Tensor,
                    grad_stats: Tensor, *, entropy: bool, mean: bool, options: BackendOptions,
                    needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for ``(rows.hidden [N, D], weight, bias)`` from ``grad_stats [n, NUM_STATS]``, by
    ``torch.func.vjp`` of a recomputation of the statistics (``stats`` is unused; ``torch.func`` also runs
    inside a custom op)."""
    def recompute(hidden: Tensor, weight: Tensor, *bias: Tensor) -> Tensor:
        return row_stats(replace(rows, hidden=hidden), weight, bias[0] if bias else None, softcap, entropy=entropy,
                         mean=mean, square=False, options=options)

    primals = [x.detach() for x in (rows.hidden, weight, bias) if x is not None]
    stats, vjp = torch.func.vjp(recompute, *primals)
    grads = (*vjp(grad_stats.to(stats.dtype)), None)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _target_logit(logits: Tensor, targets: Tensor) -> Tensor:
    """``logits[i, targets[i]]``, 0 where the target lies outside the layer (in another rank's vocabulary
    shard). The gather keeps the caller's targets when all are inside (autograd then catches an in-place
    edit of them before backward)."""
    inside = (targets >= 0) & (targets < logits.shape[1])
    if bool(inside.all()):
        return logits.gather(1, targets[:, None]).squeeze(1)
    picked = logits.gather(1, targets.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(inside, picked, torch.zeros_like(picked))


def _entropy(logits: Tensor) -> Tensor:
    """``-sum_j p_j log p_j``, in log space: ``lse - sum_j p_j z_j`` loses digits when logits are large.
    A ``-inf`` logit (a masked entry) has ``p = 0`` and adds 0."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp.clamp(min=LOG_ZERO)).sum(-1)


BACKEND = Backend("reference", row_stats, row_stats_grads)
