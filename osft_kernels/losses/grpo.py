"""The GRPO family: group-normalized advantages, the clipped policy loss with its variants (DAPO
clip-higher, dual clip, CISPO, SAPO, Dr. GRPO aggregation, KL to a reference, entropy bonus,
truncated importance sampling), and a fused one-call version from hidden states.
"""
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..api import linear_logprobs, linear_token_loss
from ..token_rows import target_mask
from .aggregation import aggregation_weights
from .checks import (
    KL_ESTIMATORS,
    check_finite_at,
    check_importance_options,
    check_like,
    check_log_ratio_limit,
    check_mask,
    check_number,
    check_policy_options,
)

ADVANTAGE_SCALES = ("group", "batch", "none")
LOG_RATIO_LIMIT = 20.0  # log-ratios are clamped to [-20, 20] before exp, as verl does (TRL does not)
LOW_VAR_KL_LIMIT = 10.0  # verl clamps the low_var_kl value to [-10, 10]
NAN_ROLLOUT = ("raise", "ratio_one")


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """``A_i = (r_i - mean of i's group) / (std + eps)``, float32 ``[num_groups * group_size]``.

    ``rewards``: 1-D, ``group_size`` consecutive completions per prompt. ``scale``: ``"group"``
    (unbiased std of the group: GRPO), ``"batch"`` (unbiased std of all rewards: TRL's
    ``scale_rewards="batch"``) or ``"none"`` (no division: Dr. GRPO). A group of one completion,
    or one whose rewards are all equal, gets advantage 0 (also with ``eps=0``). The rewards must
    be finite in float32, the dtype of the computation.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        got = (rewards.dtype, tuple(rewards.shape)) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise TypeError(f"rewards must be a 1-D floating point tensor, got {got}")
    if (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1
            or rewards.numel() % group_size):
        raise ValueError(f"group_size must be an int >= 1 dividing len(rewards) = {rewards.numel()}, "
                         f"got {group_size!r}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    check_number("eps", eps, low=0.0)
    groups = rewards.float().view(-1, group_size)
    if not bool(torch.isfinite(groups).all()):
        raise ValueError("rewards must be finite in float32, the dtype of the computation (map failed or "
                         "unparseable rewards to a number first, and keep |reward| < 3.4e38)")

    def unbiased_std(x: Tensor) -> Tensor:
        centered = x - x.mean(-1, keepdim=True)
        return (centered.square().sum(-1, keepdim=True) / max(x.shape[-1] - 1, 1)).sqrt()

    centered = groups - groups.mean(-1, keepdim=True)
    if scale == "group":
        centered = centered / (unbiased_std(groups) + eps)
    elif scale == "batch":
        centered = centered / (unbiased_std(groups.view(1, -1)) + eps)
    # exactly 0 for equal rewards, where the std is 0 (0 / 0 with eps=0) or the mean rounds off them
    advantages = torch.where((groups == groups[:, :1]).all(-1, keepdim=True), 0.0, centered)
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError("rewards overflow float32 when normalized; scale them down")
    return advantages.view(-1)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3", *,
               log_ratio_limit: float | None = LOG_RATIO_LIMIT) -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from samples of ``pi``, with ``d = ref - logp``:

    - ``"k1"``: ``-d``; ``"k2"``: ``d^2 / 2``;
    - ``"k3"``: ``exp(d) - d - 1``, ``d`` clamped to ``[-log_ratio_limit, log_ratio_limit]``
      (None: not clamped, as TRL's estimator);
    - ``"low_var_kl"``: ``clamp(k3, -10, 10)`` with ``d`` clamped to [-20, 20]: verl's
      ``"low_var_kl"`` and ``"k3"`` (zero gradient where the value is clamped);
    - ``"k1+"``, ``"low_var_kl+"``: the value of ``k1`` or ``low_var_kl`` with the gradient of
      ``k2`` (verl's straight-through ``"k1+"`` and ``"k3+"``/``"low_var_kl+"``).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    check_log_ratio_limit(log_ratio_limit)
    d = ref_logprobs - logprobs
    if estimator.endswith("+"):
        k2 = 0.5 * d.square()
        return k2 - k2.detach() + kl_penalty(logprobs, ref_logprobs, estimator[:-1]).detach()
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "low_var_kl":
        return kl_penalty(logprobs, ref_logprobs, "k3").clamp(-LOW_VAR_KL_LIMIT, LOW_VAR_KL_LIMIT)
    if log_ratio_limit is not None:
        d = d.clamp(-log_ratio_limit, log_ratio_limit)
    return torch.expm1(d) - d


def truncated_importance_weights(logp_trainer: Tensor, logp_rollout: Tensor, mask: Tensor, *, cap: float = 2.0,
                                 level: str = "token", nan_rollout: str = "raise") -> Tensor:
    """Detached ``min(pi_trainer / pi_rollout, cap)``: the correction for a rollout engine whose
    logprobs differ from the trainer's (``[..., T]``, float32, 0 outside ``mask``).

    ``level="token"``: per token; ``"sequence"``: the ratio of whole sequences,
    ``exp(sum_t (logp_trainer - logp_rollout))``, given to each of their tokens. Both logprobs must
    be finite at the masked tokens; ``nan_rollout="ratio_one"`` lets a NaN ``logp_rollout`` (a
    logprob the engine did not return) count as log-ratio 0, ratio 1, as TRL does.
    """
    if not isinstance(logp_trainer, Tensor) or logp_trainer.dim() < 1:
        raise TypeError("logp_trainer must be a torch.Tensor of shape [..., T]")
    logp_rollout = check_like("logp_rollout", logp_rollout, logp_trainer)
    mask = check_mask(mask, logp_trainer)
    check_importance_options("cap", cap, "level", level)
    if nan_rollout not in NAN_ROLLOUT:
        raise ValueError(f"nan_rollout must be one of {NAN_ROLLOUT}, got {nan_rollout!r}")
    trainer, rollout = logp_trainer.detach().float(), logp_rollout.detach().float()
    check_finite_at(mask, logp_trainer=trainer)
    known = ~rollout.isnan() if nan_rollout == "ratio_one" else torch.ones_like(mask)
    if not bool(torch.isfinite(rollout[mask & known]).all()):
        raise ValueError("logp_rollout must be finite at the masked (completion) tokens"
                         + (" (NaN is allowed with nan_rollout='ratio_one')" if nan_rollout == "raise" else ""))
    log_ratio = torch.where(mask & known, trainer - rollout, 0.0)
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)
    return torch.where(mask, _capped_ratio(log_ratio, cap), 0.0)


def _capped_ratio(log_ratio: Tensor, cap: float) -> Tensor:
    """``min(exp(log_ratio), cap)``."""
    return log_ratio.clamp(max=math.log(cap)).exp()


def policy_loss(logprobs: Tensor, old_logprobs: Tensor | None, advantages: Tensor, mask: Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                kl_bias_correction: bool = False, entropy: Tensor | None = None, entropy_coef: float = 0.0,
                entropy_agg: str | None = None, agg: str = "token-mean", num_items: float | None = None,
                norm_length: float | None = None, count_empty_sequences: bool = False,
                is_weights: Tensor | None = None, log_ratio_limit: float | None = LOG_RATIO_LIMIT,
                pg_loss: str = "ppo", sapo_temperatures: tuple[float, float] = (1.0, 1.05)
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss, per token then aggregated::

        r       = exp(clamp(logp - old_logp, -log_ratio_limit, log_ratio_limit))
        L_pg    = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))          pg_loss="ppo"
                  with dual_clip c (A < 0 only): min(L_pg, -A c)
                  -A sg(min(r, 1 + clip_high)) logp                           "cispo"
                  -A (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos if A > 0    "sapo"
                  else tau_neg (sapo_temperatures = (tau_pos, tau_neg))
        KL      = kl_penalty(logp, ref_logp), times r with kl_bias_correction
        loss    = aggregate(is_weights * L_pg + kl_coef * KL, mask, agg, num_items, norm_length)
                  - entropy_coef * aggregate(entropy, mask, entropy_agg or agg, ...)

    Args:
        logprobs: ``[..., T]`` under the current policy (differentiable). old_logprobs: the same
            under the policy that sampled (detached), or None when that is the current policy (one
            update per batch: the ratio is 1 and only its gradient matters). advantages: ``[...]``
            per sequence or ``[..., T]``.
        mask: bool ``[..., T]``, True at completion tokens.
        clip_low, clip_high: PPO clip range (DAPO's clip-higher: ``clip_high=0.28``).
        dual_clip: None or c > 1 (e.g. 3.0): bound the loss of negative-advantage tokens by ``-A c``.
        ref_logprobs, kl_coef, kl_estimator: KL penalty to a reference policy, one of
            :func:`kl_penalty`'s estimators (default ``"k3"``, TRL's; verl's ``"k3"`` is
            ``"low_var_kl"`` here. As a loss term, ``k1``'s gradient is ``grad logp``, whose
            expectation under the policy is zero).
        kl_bias_correction: multiply the KL term by the ratio ``r`` (differentiable, also on
            policy): TRL's ``use_bias_correction_kl``.
        entropy, entropy_coef: per-token entropy ``[..., T]`` and the bonus coefficient.
        entropy_agg: None aggregates the entropy like the loss (verl); one of :data:`AGGREGATIONS`
            aggregates it that way over this call's tokens alone, without ``num_items`` (TRL:
            ``"token-mean"``, with ``entropy_coef`` divided by the gradient accumulation steps).
        agg, num_items, norm_length, count_empty_sequences: see
            :mod:`osft_kernels.losses.aggregation` (``"token-mean"`` is DAPO's token-level loss;
            ``"seq-mean-token-mean"`` the GRPO paper's; ``"seq-mean-token-sum-norm"`` Dr. GRPO's).
            ``num_items``: global count for gradient accumulation (and data parallelism: see there).
        is_weights: detached per-token truncated importance weights (:func:`truncated_importance_weights`),
            finite and >= 0 at the masked tokens.
        log_ratio_limit: the clamp of ``logp - old_logp`` before ``exp`` and of ``k3``'s ``d``
            (verl's 20); None: no clamp (TRL).
        pg_loss, sapo_temperatures: the policy-gradient term: PPO's clipped ratio, CISPO's
            truncated detached ratio times ``logp`` (TRL's ``cispo`` with ``epsilon_high`` ``e`` is
            ``clip_high=e - 1``; ``clip_low`` unused) or SAPO's soft gate (TRL's ``sapo``, its default
            temperatures); ``dual_clip`` is PPO's only.

    Returns ``(loss, metrics)``; metrics are detached masked means over the completion tokens:
    ``clip_frac_low``/``clip_frac_high`` (tokens whose ratio is clipped below/above), ``approx_kl``
    (``mean((r - 1) - log r)``, the k3 estimate of KL(old || new)), ``ratio_mean``, ``ratio_max``,
    and ``dual_clip_frac``, ``kl``, ``entropy`` when those terms are in use.
    """
    if not isinstance(logprobs, Tensor) or logprobs.dim() < 1:
        raise TypeError("logprobs must be a torch.Tensor of shape [..., T]")
    mask = check_mask(mask, logprobs)
    check_finite_at(mask, logprobs=logprobs.detach())
    terms = _policy_terms(logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                          dual_clip=dual_clip, ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator,
                          kl_bias_correction=kl_bias_correction, entropy_coef=entropy_coef, entropy_agg=entropy_agg,
                          agg=agg, num_items=num_items, norm_length=norm_length,
                          count_empty_sequences=count_empty_sequences, is_weights=is_weights,
                          log_ratio_limit=log_ratio_limit, pg_loss=pg_loss, sapo_temperatures=sapo_temperatures)
    if entropy_coef and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    # values at masked tokens never matter; zero them so no inf/NaN there can reach a gradient
    logprobs = torch.where(mask, logprobs, 0.0)
    if entropy is not None:
        entropy = torch.where(mask, check_like("entropy", entropy, logprobs), 0.0)
    token_loss, parts = _token_policy_loss(logprobs, entropy, terms)
    loss = torch.where(mask, token_loss, 0.0).sum()
    return loss, _policy_metrics(parts, terms, mask)


def _policy_metrics(parts: dict[str, Tensor], terms: "_PolicyTerms", mask: Tensor) -> dict[str, Tensor]:
    """:func:`policy_loss`'s metrics from :func:`_token_policy_loss`'s per-token values: masked means,
    and the largest ratio."""
    with torch.no_grad():
        log_ratio, ratio, advantages = parts.pop("log_ratio"), parts.pop("ratio"), terms.advantages
        metrics = dict(parts)
        metrics["clip_frac_low"] = (advantages < 0) & (ratio < 1 - terms.clip_low)
        metrics["clip_frac_high"] = (advantages > 0) & (ratio > 1 + terms.clip_high)
        metrics["approx_kl"] = torch.expm1(log_ratio) - log_ratio
        metrics["ratio_mean"] = ratio
        count = mask.sum().clamp(min=1)
        summary = {name: torch.where(mask, value.detach().float(), 0.0).sum() / count
                   for name, value in metrics.items()}
        # ratios are > 0, so the masked-out zeros never win; no read-back to ask whether any token is masked in
        summary["ratio_max"] = torch.where(mask, ratio.detach().float(), 0.0).amax() if mask.numel() \
            else ratio.new_zeros((), dtype=torch.float32)
    return summary


@dataclass(frozen=True)
class _PolicyTerms:
    """The policy loss's per-token inputs besides the current logprobs and entropy (detached, 0 outside
    the mask, broadcast to the token grid), its aggregation coefficients, and its coefficients."""

    old_logprobs: Tensor | None  # None: on policy, the current logprobs
    advantages: Tensor
    ref_logprobs: Tensor | None
    is_weights: Tensor | None
    rollout_logprobs: Tensor | None  # with is_cap: per-token importance weights against the current logprobs
    is_cap: float
    weights: Tensor  # aggregation coefficients of the policy and KL terms
    entropy_weights: Tensor  # and of the entropy term
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float
    kl_estimator: str
    kl_bias_correction: bool
    entropy_coef: float
    log_ratio_limit: float | None
    pg_loss: str
    sapo_temperatures: tuple[float, float]

    def at(self, index: Tensor) -> "_PolicyTerms":
        """The terms of the tokens at flat positions ``index`` of the grid: ``[r]`` tensors."""
        pick = (lambda t: None if t is None else t.reshape(-1)[index])
        return replace(self, old_logprobs=pick(self.old_logprobs), advantages=pick(self.advantages),
                       ref_logprobs=pick(self.ref_logprobs), is_weights=pick(self.is_weights),
                       rollout_logprobs=pick(self.rollout_logprobs), weights=pick(self.weights),
                       entropy_weights=pick(self.entropy_weights))


def _policy_terms(like: Tensor, old_logprobs, advantages, mask: Tensor, *, clip_low, clip_high, dual_clip,
                  ref_logprobs, kl_coef, kl_estimator, kl_bias_correction, entropy_coef, entropy_agg, agg, num_items,
                  norm_length, count_empty_sequences, is_weights, log_ratio_limit, pg_loss,
                  sapo_temperatures, rollout_logprobs=None, is_cap=2.0) -> _PolicyTerms:
    """Check the per-token inputs against the token grid ``like [..., T]`` and ``mask``; mask them."""
    if old_logprobs is not None:
        old_logprobs = check_like("old_logprobs", old_logprobs, like).detach()
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if advantages.shape == like.shape[:-1]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != like.shape:
        raise ValueError(f"advantages must have shape {tuple(like.shape[:-1])} (per sequence) or "
                         f"{tuple(like.shape)} (per token), got {tuple(advantages.shape)}")
    advantages = advantages.detach().to(like.device, like.dtype).expand(like.shape)
    check_policy_options(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, pg_loss=pg_loss,
                         sapo_temperatures=sapo_temperatures, kl_coef=kl_coef, kl_estimator=kl_estimator,
                         kl_bias_correction=kl_bias_correction, entropy_coef=entropy_coef, entropy_agg=entropy_agg,
                         log_ratio_limit=log_ratio_limit)
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    masked = (lambda name, t: None if t is None else torch.where(mask, check_like(name, t, like).detach(), 0.0))
    ref_logprobs, is_weights = masked("ref_logprobs", ref_logprobs), masked("is_weights", is_weights)
    rollout_logprobs = masked("rollout_logprobs", rollout_logprobs)
    check_finite_at(mask, advantages=advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                     is_weights=is_weights, rollout_logprobs=rollout_logprobs)
    if is_weights is not None and bool((is_weights < 0).any()):
        raise ValueError("is_weights must be >= 0")
    dtype = torch.promote_types(like.dtype, torch.float32)
    weights = aggregation_weights(mask, agg, num_items=num_items, norm_length=norm_length,
                                  count_empty_sequences=count_empty_sequences, dtype=dtype)
    entropy_weights = weights if entropy_agg is None else aggregation_weights(
        mask, entropy_agg, norm_length=norm_length, count_empty_sequences=count_empty_sequences, dtype=dtype)
    return _PolicyTerms(masked("old_logprobs", old_logprobs), torch.where(mask, advantages, 0.0), ref_logprobs,
                        is_weights, rollout_logprobs, is_cap, weights, entropy_weights, clip_low, clip_high,
                        dual_clip, kl_coef, kl_estimator, kl_bias_correction, entropy_coef, log_ratio_limit, pg_loss,
                        (float(sapo_temperatures[0]), float(sapo_temperatures[1])))


def _token_policy_loss(logprobs: Tensor, entropy: Tensor | None, terms: _PolicyTerms) -> tuple[Tensor, dict]:
    """Per-token ``L`` of :func:`policy_loss` (elementwise) times the aggregation coefficients, and
    the per-token values its metrics use."""
    old_logprobs = logprobs.detach() if terms.old_logprobs is None else terms.old_logprobs
    advantages = terms.advantages
    log_ratio = logprobs - old_logprobs
    if terms.log_ratio_limit is not None:
        log_ratio = log_ratio.clamp(-terms.log_ratio_limit, terms.log_ratio_limit)
    ratio = log_ratio.exp()
    if terms.pg_loss == "cispo":
        token_loss = -advantages * ratio.detach().clamp(max=1 + terms.clip_high) * logprobs
    elif terms.pg_loss == "sapo":
        tau_pos, tau_neg = terms.sapo_temperatures
        tau = torch.full_like(advantages, tau_neg).masked_fill(advantages > 0, tau_pos)
        token_loss = -advantages * (4 / tau) * torch.sigmoid(tau * (ratio - 1))
    else:
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1 - terms.clip_low, 1 + terms.clip_high)
        token_loss = torch.maximum(unclipped, clipped)
    parts = {"log_ratio": log_ratio.detach(), "ratio": ratio.detach()}
    if terms.dual_clip is not None:
        bound = -advantages * terms.dual_clip
        parts["dual_clip_frac"] = (advantages < 0) & (token_loss.detach() > bound)
        token_loss = torch.where(advantages < 0, torch.minimum(token_loss, bound), token_loss)
    is_weights = terms.is_weights
    if terms.rollout_logprobs is not None:  # on policy, per token: this pass's own logprobs are the trainer's
        is_weights = _capped_ratio(logprobs.detach() - terms.rollout_logprobs, terms.is_cap)
    if is_weights is not None:
        token_loss = token_loss * is_weights
    if terms.ref_logprobs is not None:
        kl = kl_penalty(logprobs, terms.ref_logprobs, terms.kl_estimator, log_ratio_limit=terms.log_ratio_limit)
        if terms.kl_bias_correction:
            kl = kl * ratio
        token_loss = token_loss + terms.kl_coef * kl
        parts["kl"] = kl.detach()
    token_loss = terms.weights * token_loss
    if entropy is not None:
        token_loss = token_loss - terms.entropy_coef * (terms.entropy_weights * entropy)
        parts["entropy"] = entropy.detach()
    return token_loss, parts


def grpo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old_logprobs: Tensor | None, advantages: Tensor, *,
              ref_logprobs: Tensor | None = None, is_weights: Tensor | None = None,
              rollout_logprobs: Tensor | None = None, is_cap: float = 2.0, is_level: str = "token",
              clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None, kl_coef: float = 0.0,
              kl_estimator: str = "k3", kl_bias_correction: bool = False, entropy_coef: float = 0.0,
              entropy_agg: str | None = None, agg: str = "token-mean", num_items: float | None = None,
              norm_length: float | None = None, count_empty_sequences: bool = False,
              log_ratio_limit: float | None = LOG_RATIO_LIMIT, pg_loss: str = "ppo",
              sapo_temperatures: tuple[float, float] = (1.0, 1.05), temperature: float | Tensor = 1.0,
              ignore_index: int = -100, bias: Tensor | None = None, softcap: float | None = None, shift: bool = False,
              backend: str = "auto", **kernel_options) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`policy_loss` of the completion tokens, straight from hidden states, in one fused pass
    (:func:`osft_kernels.linear_token_loss`, with the entropy when ``entropy_coef != 0``): every
    token's loss depends only on its own logprob and entropy and on values known before the call, so
    the chunked backends form the gradients during the forward pass (6NDV FLOPs, where logprobs and
    then :func:`policy_loss` take 8NDV). The metrics are :func:`policy_loss`'s, computed once.

    The completion tokens are the non-ignored (shifted) ``targets``; ``old_logprobs``,
    ``ref_logprobs``, ``is_weights`` and ``rollout_logprobs`` are shaped like them, ``advantages``
    per sequence or per token. Other arguments as in :func:`policy_loss` and
    :func:`osft_kernels.linear_logprobs`.

    ``rollout_logprobs`` (instead of ``is_weights``): the rollout engine's logprobs; the loss is then
    weighted by :func:`truncated_importance_weights` of the trainer's logprobs over them (``is_cap``,
    ``is_level``). The trainer's logprobs are ``old_logprobs``, or on policy (``old_logprobs=None``)
    those of this pass, detached: per token inside the fused pass itself, per sequence from a
    no-grad pass of the output layer first (a sequence's weight needs all its tokens). Either way
    the decoder runs once.
    """
    mask = target_mask(targets, ignore_index, shift)
    if rollout_logprobs is not None:
        if is_weights is not None:
            raise ValueError("pass is_weights or rollout_logprobs (the weights are then formed here), not both")
        check_importance_options("is_cap", is_cap, "is_level", is_level)
        trainer = old_logprobs
        if trainer is None and is_level == "sequence":
            with torch.no_grad():
                trainer = linear_logprobs(hidden, weight, targets, temperature=temperature, ignore_index=ignore_index,
                                          bias=bias, softcap=softcap, shift=shift, backend=backend,
                                          **kernel_options).logprobs
        if trainer is not None:
            is_weights = truncated_importance_weights(trainer, rollout_logprobs, mask, cap=is_cap, level=is_level)
            rollout_logprobs = None
    grid = torch.zeros(mask.shape, device=hidden.device)
    terms = _policy_terms(grid, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                          dual_clip=dual_clip, ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator,
                          kl_bias_correction=kl_bias_correction, entropy_coef=entropy_coef, entropy_agg=entropy_agg,
                          agg=agg, num_items=num_items, norm_length=norm_length,
                          count_empty_sequences=count_empty_sequences, is_weights=is_weights,
                          log_ratio_limit=log_ratio_limit, pg_loss=pg_loss, sapo_temperatures=sapo_temperatures,
                          rollout_logprobs=rollout_logprobs, is_cap=is_cap)

    def token_loss(logprobs: Tensor, entropy: Tensor | None, index: Tensor) -> Tensor:
        return _token_policy_loss(logprobs, entropy, terms.at(index))[0]

    loss, out = linear_token_loss(hidden, weight, targets, token_loss, return_entropy=bool(entropy_coef),
                                  temperature=temperature, ignore_index=ignore_index, bias=bias, softcap=softcap,
                                  shift=shift, backend=backend, **kernel_options)
    # out holds 0 at the masked positions, as policy_loss's zeroed logprobs and entropy do
    return loss, _policy_metrics(_token_policy_loss(out.logprobs, out.entropy, terms)[1], terms, mask)
