"""osft_kernels.losses.grpo (advantages, KL estimators, truncated importance weights, the policy loss
and its fused form) against float64 loops written here from the documented formulas: to 1e-10 on
float64 inputs; fused paths on float32 to 1e-5 relative (losses) and 1e-4 (gradients)."""
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from helpers.loss_cases import F64, aggregate_loop, logprob_pair, ragged_mask
from helpers.read_backs import record_read_backs

from osft_kernels.losses import (
    group_advantages,
    grpo_loss,
    kl_penalty,
    policy_loss,
    truncated_importance_weights,
)


def advantages_loop(rewards, group_size, scale, eps=1e-6):
    values = [float(r) for r in rewards]
    groups = [values[i:i + group_size] for i in range(0, len(values), group_size)]

    def std(xs):
        mu = sum(xs) / len(xs)
        return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0

    out = []
    for g in groups:
        mu = sum(g) / len(g)
        for r in g:
            a = r - mu
            if scale == "group":
                a /= std(g) + eps
            elif scale == "batch":
                a /= std(values) + eps
            out.append(a)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_group_advantages_match_loop(scale, group_size):
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    ours = group_advantages(rewards, group_size, scale=scale)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), advantages_loop(rewards, group_size, scale), rtol=1e-6, atol=1e-6)
    if group_size == 1:
        assert not ours.any()


def test_group_advantages_arguments_are_checked():
    with pytest.raises(ValueError, match="group_size must be an int >= 1 dividing len"):
        group_advantages(torch.ones(6), 4)
    with pytest.raises(TypeError, match="rewards must be a 1-D floating point tensor"):
        group_advantages(torch.ones(2, 3), 3)
    with pytest.raises(ValueError, match="rewards must be finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.ones(4), 2, scale="global")


def test_kl_estimators_match_formulas():
    logp = torch.tensor([-1.0, -2.0, -0.1, -30.0], dtype=F64)
    ref = torch.tensor([-1.5, -0.5, -0.1, -1.0], dtype=F64)  # the last d = 29 hits the [-20, 20] clamp
    d = [float(r - lp) for lp, r in zip(logp, ref)]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([-x for x in d], dtype=F64))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([x * x / 2 for x in d], dtype=F64))
    k3 = [math.exp(min(x, 20.0)) - min(x, 20.0) - 1 for x in d]
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor(k3, dtype=F64))
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        kl_penalty(logp, ref, "k4")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_truncated_importance_weights_match_loop(level):
    mask, trainer, rollout = logprob_pair(6)
    trainer[0, 2] = 5.0  # a ratio far above the cap
    ours = truncated_importance_weights(trainer, rollout, mask, cap=1.5, level=level)
    expected = torch.zeros(4, 9, dtype=F64)
    for i in range(4):
        seq = sum(float(trainer[i, t] - rollout[i, t]) for t in range(9) if mask[i, t])
        for t in range(9):
            if mask[i, t]:
                log_ratio = seq if level == "sequence" else float(trainer[i, t] - rollout[i, t])
                expected[i, t] = min(math.exp(log_ratio), 1.5)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=1e-7)
    assert (ours == 1.5).any() and not ours.requires_grad


def policy_loop(logp, old, adv, mask, *, clip_low, clip_high, dual_clip, ref, kl_coef, estimator, entropy,
                entropy_coef, is_weights):
    """Per-token float64 loss from the policy_loss docstring's formulas, as a [B, T] tensor of scalars."""
    token = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            a = float(adv[i]) if adv.dim() == 1 else float(adv[i, t])
            r = torch.exp((logp[i, t] - old[i, t]).clamp(-20, 20))
            pg = torch.maximum(-a * r, -a * r.clamp(1 - clip_low, 1 + clip_high))
            if dual_clip is not None and a < 0:
                pg = torch.minimum(pg, torch.tensor(-a * dual_clip, dtype=F64))
            if is_weights is not None:
                pg = pg * is_weights[i, t]
            if ref is not None:
                d = ref[i, t] - logp[i, t]
                kl = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d.clamp(-20, 20)) - d.clamp(-20, 20) - 1}[estimator]
                pg = pg + kl_coef * kl
            if entropy is not None:
                pg = pg - entropy_coef * entropy[i, t]
            token[i, t] = pg
    return token


POLICY_VARIANTS = {
    "ppo": {},
    "dapo-clip-higher": {"clip_high": 0.28},
    "dual-clip": {"dual_clip": 3.0},
    "kl-k1": {"kl_coef": 0.05, "kl_estimator": "k1"},
    "kl-k2": {"kl_coef": 0.05, "kl_estimator": "k2"},
    "kl-k3-entropy": {"kl_coef": 0.05, "kl_estimator": "k3", "entropy_coef": 0.01},
    "is-weights": {"is_weights": True},
}


@pytest.mark.parametrize("variant", list(POLICY_VARIANTS))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_policy_loss_matches_loop(variant, agg, per_token_advantages):
    gen = torch.Generator().manual_seed(7)
    mask = ragged_mask()
    logp = (-torch.rand(4, 9, dtype=F64, generator=gen) * 3).requires_grad_()
    old = logp.detach() + torch.randn(4, 9, dtype=F64, generator=gen) * 0.4
    old[0, 0] = logp[0, 0].detach() - 30.0  # log-ratio 30: hits the [-20, 20] clamp and the upper clip
    old[1, 4] = logp[1, 4].detach() + 3.0   # ratio e^-3: below the lower clip
    old[1, 5] = logp[1, 5].detach() - 2.0   # ratio e^2 with a negative advantage: beyond the dual clip
    adv = torch.tensor([1.5, -2.0, 0.7, 1.0], dtype=F64)
    if per_token_advantages:
        adv = adv[:, None] * torch.linspace(0.5, 1.5, 9, dtype=F64)
    options = dict(clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0)
    options.update({k: v for k, v in POLICY_VARIANTS[variant].items() if k != "is_weights"})
    ref = logp.detach() + torch.randn(4, 9, dtype=F64, generator=gen) * 0.5 if options["kl_coef"] else None
    entropy = (torch.rand(4, 9, dtype=F64, generator=gen) * 2).requires_grad_() if options["entropy_coef"] else None
    is_weights = torch.rand(4, 9, dtype=F64, generator=gen) * 2 if "is_weights" in POLICY_VARIANTS[variant] else None

    loss, metrics = policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=entropy, agg=agg,
                                is_weights=is_weights, **options)
    token = policy_loop(logp, old, adv, mask, ref=ref, entropy=entropy, is_weights=is_weights,
                        estimator=options.pop("kl_estimator"), **options)
    expected = aggregate_loop(token.detach(), mask, agg)
    assert abs(loss.item() - expected) <= 1e-10 * max(1.0, abs(expected))
    # gradients: the loop's per-token losses aggregated with the loop's own coefficients
    unit = torch.eye(36, dtype=F64).view(36, 4, 9)  # unit[k] is 1 at token k only
    coef = torch.tensor([aggregate_loop(unit[k], mask, agg) for k in range(36)], dtype=F64).view(4, 9)
    leaves = [x for x in (logp, entropy) if x is not None]
    ours = torch.autograd.grad(loss, leaves)
    theirs = torch.autograd.grad((token * coef).sum(), leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # metrics
    ratio = torch.exp((logp.detach() - old).clamp(-20, 20))
    a = adv[:, None].expand(4, 9) if adv.dim() == 1 else adv
    n = int(mask.sum())
    high = 1 + POLICY_VARIANTS[variant].get("clip_high", 0.2)
    assert metrics["clip_frac_high"].item() == pytest.approx(float(((a > 0) & (ratio > high) & mask).sum()) / n)
    assert metrics["clip_frac_low"].item() == pytest.approx(float(((a < 0) & (ratio < 0.8) & mask).sum()) / n)
    assert metrics["ratio_max"].item() == pytest.approx(ratio[mask].max().item(), rel=1e-6)
    assert metrics["ratio_mean"].item() == pytest.approx(ratio[mask].mean().item(), rel=1e-6)
    assert metrics["approx_kl"].item() == pytest.approx((ratio - 1 - ratio.log())[mask].mean().item(), rel=1e-6)
    assert metrics["clip_frac_high"] > 0 and metrics["clip_frac_low"] > 0
    if "dual_clip" in POLICY_VARIANTS[variant]:
        clipped = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
        active = (a < 0) & (clipped > -a * 3.0) & mask
        assert active.any()
        assert metrics["dual_clip_frac"].item() == pytest.approx(float(active.sum()) / n)


def test_policy_loss_arguments_are_checked():
    logp, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    adv = torch.ones(2)
    with pytest.raises(ValueError, match="old_logprobs must have the shape of logprobs"):
        policy_loss(logp, torch.zeros(2, 4), adv, mask)
    with pytest.raises(ValueError, match=r"advantages must have shape \(2,\) \(per sequence\) or \(2, 3\)"):
        policy_loss(logp, logp, torch.ones(3), mask)
    with pytest.raises(ValueError, match="dual_clip must be None or > 1"):
        policy_loss(logp, logp, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logprobs"):
        policy_loss(logp, logp, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy_coef != 0 needs entropy"):
        policy_loss(logp, logp, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match="advantages must be finite at the masked"):
        policy_loss(logp, logp, torch.tensor([1.0, float("nan")]), mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor or contain only 0 and 1"):
        policy_loss(logp, logp, adv, torch.full((2, 3), 2))


def test_policy_loss_all_masked_row_and_batch():
    logp = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    for agg in ("token-mean", "seq-mean-token-mean"):
        loss, metrics = policy_loss(logp, logp.detach(), torch.tensor([1.0, 2.0]), mask, agg=agg)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
        loss, metrics = policy_loss(logp, logp.detach(), torch.tensor([1.0, 2.0]), torch.zeros_like(mask), agg=agg)
        (grad,) = torch.autograd.grad(loss, logp)
        assert loss.item() == 0.0 and not grad.any() and all(v.item() == 0 for v in metrics.values())


def grpo_case(seed=8):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 8, 12, generator=gen).requires_grad_()
    weight = (torch.randn(31, 12, generator=gen) * 0.4).requires_grad_()
    targets = torch.randint(0, 31, (4, 8), generator=gen)
    targets[:, :3] = -100  # prompt
    targets[1, 6:] = -100  # a shorter completion
    old = -torch.rand(4, 7, generator=gen) * 4
    ref = -torch.rand(4, 7, generator=gen) * 4
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    return hidden, weight, targets, old, ref, adv


# these tensors are on the CPU, where the triton backend runs in the interpreter (conftest.py)
FUSED_BACKENDS = ["torch", "cpu"] + (["triton"] if importlib.util.find_spec("triton")
                              and os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.mark.parametrize("fused", FUSED_BACKENDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grpo_loss_fused_matches_reference_backend(agg, fused):
    hidden, weight, targets, old, ref, adv = grpo_case()
    kwargs = dict(ref_logprobs=ref, kl_coef=0.02, entropy_coef=0.01, clip_high=0.28, dual_clip=3.0, agg=agg,
                  temperature=0.9, shift=True)
    results = []
    for backend in (fused, "reference"):
        loss, metrics = grpo_loss(hidden, weight, targets, old, adv, backend=backend, **kwargs)
        results.append((loss, metrics, torch.autograd.grad(loss, (hidden, weight))))
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for name in metrics:
        torch.testing.assert_close(metrics[name], ref_metrics[name], rtol=1e-4, atol=1e-6)
    assert set(metrics) >= {"clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "ratio_max", "entropy", "kl"}


@pytest.mark.parametrize("fused", FUSED_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("on_policy", [True, False])
def test_grpo_loss_forms_importance_weights_from_rollout_logprobs(fused, level, on_policy):
    """``rollout_logprobs`` weights the loss by min(pi_trainer / pi_rollout, is_cap), with the trainer's
    logprobs the old ones or, on policy, this pass's own; equal to passing those weights, computed
    here in float64 from the logits, as ``is_weights``."""
    hidden, weight, targets, old, ref, adv = grpo_case(seed=12)
    mask = targets[:, 1:] != -100
    logits = hidden.detach().double()[:, :-1] @ weight.detach().double().T / 0.9
    current = logits.log_softmax(-1).gather(-1, targets[:, 1:].clamp(min=0)[..., None])[..., 0]
    trainer = current if on_policy else old.double()
    noise = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.4
    rollout = torch.where(mask, trainer + noise, 0.0).float()
    old = None if on_policy else old
    kwargs = dict(ref_logprobs=ref, kl_coef=0.02, entropy_coef=0.01, dual_clip=3.0, agg="seq-mean-token-mean",
                  temperature=0.9, shift=True)
    is_weights = truncated_importance_weights(trainer, rollout.double(), mask, cap=1.3, level=level)
    assert (is_weights[mask] == 1.3).any() and (is_weights[mask] < 1.3).any()
    loss, metrics = grpo_loss(hidden, weight, targets, old, adv, rollout_logprobs=rollout, is_cap=1.3, is_level=level,
                              backend=fused, **kwargs)
    expected, expected_metrics = grpo_loss(hidden, weight, targets, old, adv, is_weights=is_weights.float(),
                                           backend="reference", **kwargs)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(expected, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for name in expected_metrics:
        torch.testing.assert_close(metrics[name], expected_metrics[name], rtol=1e-4, atol=1e-6)


def test_grpo_loss_reads_back_three_values_per_call(monkeypatch):
    """One fused GRPO call with every per-token input reads three values back to the host: the
    target range check, one finite check of all per-token inputs, and (in backward) whether the
    upstream gradient is 1; none per chunk or per input."""
    import osft_kernels

    hidden, weight, targets, old, ref, adv = grpo_case(seed=4)
    rollout = torch.where(targets[:, 1:] != -100, old + 0.1, 0.0)
    reads = record_read_backs(monkeypatch, str(Path(osft_kernels.__file__).parent))
    loss, _ = grpo_loss(hidden, weight, targets, None, adv, ref_logprobs=ref, rollout_logprobs=rollout, kl_coef=0.1,
                        entropy_coef=0.01, shift=True, backend="cpu", memory_budget=1984)
    loss.backward()
    assert len(reads) == 3, reads


def test_grpo_loss_refuses_bad_importance_options():
    hidden, weight, targets, old, _, adv = grpo_case()
    rollout = torch.zeros(old.shape)
    with pytest.raises(ValueError, match="pass is_weights or rollout_logprobs"):
        grpo_loss(hidden, weight, targets, None, adv, is_weights=torch.ones(old.shape), rollout_logprobs=rollout,
                  shift=True)
    with pytest.raises(ValueError, match="is_cap must be > 0"):
        grpo_loss(hidden, weight, targets, None, adv, rollout_logprobs=rollout, is_cap=0.0, shift=True)
    with pytest.raises(ValueError, match="is_level must be 'token' or 'sequence'"):
        grpo_loss(hidden, weight, targets, None, adv, rollout_logprobs=rollout, is_level="batch", shift=True)
    rollout[0, 5] = float("nan")  # a completion token
    with pytest.raises(ValueError, match="rollout_logprobs must be finite at the masked"):
        grpo_loss(hidden, weight, targets, None, adv, rollout_logprobs=rollout, shift=True)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
def test_grpo_micro_batches_with_num_items_match_the_full_batch(agg):
    hidden, weight, targets, old, _, adv = grpo_case(seed=9)
    mask = targets[:, 1:] != -100
    count = float(mask.sum()) if agg == "token-mean" else 4.0
    full_loss, _ = grpo_loss(hidden, weight, targets, old, adv, agg=agg, shift=True)
    full = torch.autograd.grad(full_loss, (hidden, weight))
    summed = [torch.zeros_like(hidden), torch.zeros_like(weight)]
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        loss, _ = grpo_loss(hidden[rows], weight, targets[rows], old[rows], adv[rows], agg=agg, shift=True,
                            num_items=count)
        for acc, g in zip(summed, torch.autograd.grad(loss, (hidden, weight))):
            acc += g
    for a, b in zip(summed, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_policy_loss_without_old_logprobs_is_on_policy():
    """``old_logprobs=None`` (one update per batch) means old = current, detached: ratio 1, same gradient."""
    gen = torch.Generator().manual_seed(11)
    logp = (-torch.rand(3, 5, generator=gen) * 2).requires_grad_()
    mask = torch.rand(3, 5, generator=gen) > 0.3
    adv = torch.randn(3, generator=gen)
    ours, metrics = policy_loss(logp, None, adv, mask, dual_clip=3.0)
    expected, _ = policy_loss(logp, logp.detach(), adv, mask, dual_clip=3.0)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(expected, logp)[0])
    assert metrics["ratio_mean"].item() == 1.0 and metrics["clip_frac_low"] == 0 and metrics["clip_frac_high"] == 0
