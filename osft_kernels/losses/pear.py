"""PEAR (arXiv 2602.01058): SFT on offline data reweighted by importance ratios of the current
policy over the policy that generated the data.

Implemented definition, per sequence, over its response tokens (``mask`` True) numbered
``t = 1..T`` in order (``T`` is that sequence's own response length)::

    d_t      = clip(logp_current_t - logp_behavior_t, *log_ratio_clip)
    sequence:  log G_t = sum_{k=1..T} d_k                                  (the same for every token)
    token:     log G_t = (T - t) log(gamma) + sum_{k>t} d_k                (later tokens only)
    block:     tokens in blocks I_j of ``block_size`` consecutive response tokens, e_j = last
               position of block j, rho_j = sum_{k in I_j} d_k:
               log G_t = (T - e_j) log(gamma) + sum_{m>j} rho_m            for t in I_j
    weight_t = exp(clip(log G_t, *log_weight_clip)), and 0 at tokens outside the mask.

``block_size=1`` is the token level. The suffix sums are exclusive reverse cumulative sums, O(T).
The weights are detached: PEAR's loss is ``sum_t sg[weight_t] * loss_t``.
"""
import math

import torch
from torch import Tensor

from ..api import linear_logprobs
from ..checks import is_finite_number
from ..token_rows import target_mask
from .aggregation import NORMALIZATIONS, aggregate
from .checks import check_interval, check_mask

LEVELS = ("token", "block", "sequence")


def _exclusive_suffix_sum(x: Tensor) -> Tensor:
    """``out[..., t] = sum_{k > t} x[..., k]``."""
    return x.flip(-1).cumsum(-1).flip(-1) - x


def pear_weights(logp_current: Tensor, logp_behavior: Tensor, mask: Tensor, *, level: str = "token",
                 block_size: int = 4, gamma: float = 0.999, log_ratio_clip: tuple[float, float] = (-0.08, 0.3),
                 log_weight_clip: tuple[float, float] = (-10.0, 5.0)) -> Tensor:
    """PEAR importance weights (definition in the module docstring).

    Args:
        logp_current: ``[..., T]`` log-probabilities of the data tokens under the model being trained
            (detached here); logp_behavior: the same under the data-generating policy.
        mask: bool ``[..., T]``, True at response tokens; rows may have any number of them.
        level: ``"token"``, ``"block"`` or ``"sequence"``. block_size: tokens per block (block level).
        gamma: discount in (0, 1]. log_ratio_clip: clip of each ``d_t``. log_weight_clip: clip of
            ``log G_t`` before ``exp``.

    Returns float32 ``[..., T]`` weights, detached, 0 outside the mask.
    """
    if not isinstance(logp_current, Tensor) or not isinstance(logp_behavior, Tensor):
        raise TypeError("logp_current and logp_behavior must be torch.Tensors")
    if logp_current.dim() < 1 or logp_behavior.shape != logp_current.shape:
        raise ValueError(f"logp_current and logp_behavior must have the same shape [..., T], got "
                         f"{tuple(logp_current.shape)} and {tuple(logp_behavior.shape)}")
    mask = check_mask(mask, logp_current)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not is_finite_number(gamma) or not 0 < gamma <= 1:
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
    ratio_low, ratio_high = check_interval("log_ratio_clip", log_ratio_clip)
    weight_low, weight_high = check_interval("log_weight_clip", log_weight_clip)

    log_ratio = logp_current.detach().float() - logp_behavior.detach().float().to(logp_current.device)
    if not bool(torch.isfinite(log_ratio[mask]).all()):
        raise ValueError("logp_current and logp_behavior must be finite at the masked (response) tokens")
    m = mask.float()
    d = torch.where(mask, log_ratio.clamp(ratio_low, ratio_high), 0.0)
    length = m.sum(-1, keepdim=True)
    position = m.cumsum(-1)  # 1-based position of each response token
    log_gamma = math.log(gamma)
    if level == "sequence":
        log_weight = d.sum(-1, keepdim=True).expand_as(d)
    elif level == "token" or block_size == 1:
        log_weight = _exclusive_suffix_sum(d) + (length - position) * log_gamma
    else:
        block = ((position - 1).clamp(min=0) // block_size).long()
        num_blocks = -(-mask.shape[-1] // block_size)
        block_sums = d.new_zeros(*d.shape[:-1], num_blocks).scatter_add_(-1, block, d)
        block_end = torch.minimum((block + 1) * block_size, length)
        log_weight = _exclusive_suffix_sum(block_sums).gather(-1, block) + (length - block_end) * log_gamma
    return torch.where(mask, log_weight.clamp(weight_low, weight_high).exp(), 0.0)


def pear_loss(hidden: Tensor, weight: Tensor, targets: Tensor, logp_behavior: Tensor, *, level: str = "token",
              block_size: int = 4, gamma: float = 0.999, log_ratio_clip: tuple[float, float] = (-0.08, 0.3),
              log_weight_clip: tuple[float, float] = (-10.0, 5.0), normalize: str = "tokens",
              num_items: float | None = None, temperature: float | Tensor = 1.0, ignore_index: int = -100,
              bias: Tensor | None = None, softcap: float | None = None, shift: bool = False, backend: str = "auto",
              return_weights: bool = False, **kernel_options) -> Tensor | tuple[Tensor, Tensor]:
    """PEAR-weighted SFT loss: ``aggregate(-weight_t * log p(y_t))`` from one fused logprob pass.

    The current policy's logprobs come from the same pass as the loss (so they cost nothing extra);
    ``logp_behavior`` is shaped like the (shifted) targets. The response tokens are the non-ignored
    targets. ``normalize``: ``"tokens"`` or ``"sequences"`` (see :func:`sft_loss`). Other arguments
    as in :func:`pear_weights` and :func:`osft_kernels.linear_logprobs`. Returns a float32 scalar; with
    ``return_weights``, also the detached float32 weights (shaped like the shifted targets, 0 at ignored ones).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be 'tokens' or 'sequences', got {normalize!r}")
    mask = target_mask(targets, ignore_index, shift)
    logprobs = linear_logprobs(hidden, weight, targets, temperature=temperature, ignore_index=ignore_index,
                               bias=bias, softcap=softcap, shift=shift, backend=backend, **kernel_options).logprobs
    weights = pear_weights(logprobs, logp_behavior, mask, level=level, block_size=block_size, gamma=gamma,
                           log_ratio_clip=log_ratio_clip, log_weight_clip=log_weight_clip)
    loss = aggregate(-weights * logprobs, mask, NORMALIZATIONS[normalize], num_items=num_items)
    return (loss, weights) if return_weights else loss
