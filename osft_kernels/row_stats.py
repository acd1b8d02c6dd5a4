"""Per-token statistics of the softmax over the vocabulary, and the token-level formulas built on them.

Every backend reduces a row of logits ``z`` (``[V]``, already transformed by bias, softcap and
temperature) to six numbers, stored as the columns of one ``[n, NUM_STATS]`` tensor:

    lse          = logsumexp_j z_j
    target_logit = z_y
    mean_logit   = sum_j z_j / V              (only when requested, e.g. by label smoothing, else 0)
    entropy      = lse - sum_j p_j z_j        (only when requested, else 0)
    max_logit    = max_j z_j                  (always; no gradient)
    square_lse   = logsumexp_j 2 z_j          (only when requested, else 0; no gradient)

Backends make the first four differentiable; the losses below are plain PyTorch on them, so each
formula exists exactly once and autograd turns upstream gradients on logprobs, entropy or loss
into gradients on the statistics. The last two feed metrics: whether the target is the most likely
token, and ``log sum_j p_j^2``.
"""
from typing import NamedTuple

import torch
from torch import Tensor

LSE, TARGET_LOGIT, MEAN_LOGIT, ENTROPY, MAX_LOGIT, SQUARE_LSE = range(6)
NUM_STATS = 6


class RowStats(NamedTuple):
    """Views of the columns of a ``[..., NUM_STATS]`` statistics tensor; each is ``[...]``."""

    lse: Tensor
    target_logit: Tensor
    mean_logit: Tensor
    entropy: Tensor
    max_logit: Tensor
    square_lse: Tensor

    @classmethod
    def of(cls, stats: Tensor) -> "RowStats":
        return cls(*stats.unbind(-1))


def token_logprobs(stats: RowStats) -> Tensor:
    """``log p(y) = z_y - lse``, ``[n]``."""
    return stats.target_logit - stats.lse


def token_is_top1(stats: RowStats) -> Tensor:
    """Whether the target's logit is the largest (ties count), bool ``[n]``."""
    return stats.target_logit >= stats.max_logit


def token_log_sum_sq_probs(stats: RowStats) -> Tensor:
    """``log sum_j p_j^2 = logsumexp_j 2 z_j - 2 lse``, ``[n]``."""
    return stats.square_lse - 2 * stats.lse


def token_cross_entropy(stats: RowStats, label_smoothing: float, z_loss: float) -> Tensor:
    """``(1-eps) * (lse - z_y) + eps * (lse - mean_j z_j) + z_loss * lse**2``, ``[n]``, unweighted."""
    loss = stats.lse - stats.target_logit
    if label_smoothing:
        smooth = stats.lse - stats.mean_logit
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    if z_loss:
        loss = loss + z_loss * stats.lse.square()
    return loss


def stat_grads(loss_of_stats, stats: Tensor) -> tuple[Tensor, Tensor]:
    """Value and gradient of the scalar ``loss_of_stats(stats).sum()`` with respect to ``stats [n, 4]``.

    Used by backends that form the logit gradient during the forward pass: they differentiate the
    loss formula itself instead of restating its derivative. Returns ``(loss [], d_stats [n, 4])``.
    """
    with torch.enable_grad():
        leaf = stats.detach().requires_grad_(True)
        loss = loss_of_stats(leaf).sum()
        grad = torch.autograd.grad(loss, leaf, allow_unused=True)[0] if loss.requires_grad else None
    return loss.detach(), torch.zeros_like(leaf) if grad is None else grad
