"""Faults of osft_kernels.losses that once passed silently or were blamed on the wrong argument, and
the options that give TRL's and verl's numbers, each against a float64 loop written here from the
formulas in their documentation and papers (no code under test).

The options are imported inside the tests that use them, so that on the code before each fix
every test here fails on its own.
"""
import math

import pytest
import torch
from helpers.gloo_ranks import run_ranks
from helpers.loss_cases import F64, logprob_pair, ragged_mask

from osft_kernels.losses import (
    aggregate,
    group_advantages,
    kl_penalty,
    policy_loss,
    sft_loss,
    truncated_importance_weights,
)

# ---------------------------------------------------------------------------------------------
# aggregation

def test_aggregate_refuses_a_mask_that_would_broadcast():
    loss = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 2\), got \(2,\)"):
        aggregate(loss, torch.tensor([True, True]))  # broadcast, this gave 2.0 for a mean of ones
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 2\), got \(2, 2, 1\)"):
        aggregate(loss, torch.ones(2, 2, 1, dtype=torch.bool))


def test_aggregate_accepts_a_0_1_integer_mask_and_refuses_other_integers():
    loss = torch.randn(4, 9, dtype=F64, generator=torch.Generator().manual_seed(0))
    mask = ragged_mask()
    for agg in ("token-mean", "seq-mean-token-mean"):
        assert aggregate(loss, mask.long(), agg).item() == aggregate(loss, mask, agg).item()
        assert aggregate(loss, mask.to(torch.uint8), agg).item() == aggregate(loss, mask, agg).item()
    with pytest.raises(ValueError, match="mask must be a bool tensor or contain only 0 and 1"):
        aggregate(loss, mask.long() * 2)


def seq_mean_loop(loss, mask, token_mean):
    """TRL's grpo (token_mean) and luspo (token sum) aggregation: the mean over every row, empty ones
    contributing 0."""
    rows = []
    for i in range(loss.shape[0]):
        values = [float(loss[i, t]) for t in range(loss.shape[1]) if mask[i, t]]
        rows.append(sum(values) / max(len(values), 1) if token_mean else sum(values))
    return sum(rows) / len(rows)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_can_count_empty_sequences(agg):
    loss = torch.randn(4, 9, dtype=F64, generator=torch.Generator().manual_seed(1))
    mask = ragged_mask()
    expected = seq_mean_loop(loss, mask, agg == "seq-mean-token-mean")
    ours = aggregate(loss, mask, agg, count_empty_sequences=True)
    assert abs(ours.item() - expected) <= 1e-12
    # the default skips the empty row, as verl does: 4/3 of that
    assert abs(aggregate(loss, mask, agg).item() - expected * 4 / 3) <= 1e-12


# ---------------------------------------------------------------------------------------------
# advantages

def test_group_advantages_of_equal_rewards_are_zero_with_eps_0():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0])
    for scale in ("group", "batch", "none"):
        ours = group_advantages(rewards, 3, scale=scale, eps=0.0)
        assert torch.isfinite(ours).all()
        assert (ours[:3] == 0).all()  # the promise, exactly (the float mean of 0.1s is not 0.1)
    values = [1.0, 0.0, 1.0]
    mu = sum(values) / 3
    std = math.sqrt(sum((x - mu) ** 2 for x in values) / 2)
    expected = torch.tensor([(x - mu) / std for x in values], dtype=F64)
    torch.testing.assert_close(group_advantages(rewards, 3, eps=0.0)[3:].double(), expected, rtol=1e-6, atol=1e-6)


def test_group_advantages_refuse_rewards_that_overflow_float32():
    with pytest.raises(ValueError, match="rewards must be finite in float32"):
        group_advantages(torch.tensor([1e300, 0.0], dtype=F64), 2)  # finite in float64, inf in float32
    with pytest.raises(ValueError, match="rewards overflow float32"):
        group_advantages(torch.tensor([3e38, 3e38, -3e38, 0.0]), 4)  # the sum overflows


# ---------------------------------------------------------------------------------------------
# non-finite logprobs and importance weights

def test_truncated_importance_weights_refuse_non_finite_logprobs_at_completion_tokens():
    mask = ragged_mask()
    trainer = torch.randn(4, 9, generator=torch.Generator().manual_seed(2)) * 0.3
    rollout = trainer + 0.1
    bad = rollout.clone()
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match="logp_rollout must be finite at the masked"):
        truncated_importance_weights(trainer, bad, mask)
    bad[1, 4] = float("-inf")
    with pytest.raises(ValueError, match="logp_rollout must be finite at the masked"):
        truncated_importance_weights(trainer, bad, mask, nan_rollout="ratio_one")  # only NaN is forgiven
    bad = trainer.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logp_trainer must be finite at the masked"):
        truncated_importance_weights(bad, rollout, mask)
    outside = rollout.clone()
    outside[1, 0] = float("nan")  # not a completion token: no error, no effect
    torch.testing.assert_close(truncated_importance_weights(trainer, outside, mask),
                               truncated_importance_weights(trainer, rollout, mask))
    with pytest.raises(ValueError, match="nan_rollout must be one of"):
        truncated_importance_weights(trainer, rollout, mask, nan_rollout="zero")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_truncated_importance_weights_nan_rollout_ratio_one_is_trl(level):
    """TRL: a NaN sampling logprob gives a log-ratio of 0 (ratio 1), also inside a sequence's sum."""
    mask, trainer, rollout = logprob_pair(3)
    rollout[0, 2] = rollout[2, 5] = float("nan")
    ours = truncated_importance_weights(trainer, rollout, mask, cap=1.5, level=level, nan_rollout="ratio_one")
    expected = torch.zeros(4, 9, dtype=F64)
    for i in range(4):
        d = [0.0 if math.isnan(float(rollout[i, t])) else float(trainer[i, t] - rollout[i, t]) for t in range(9)]
        seq = sum(d[t] for t in range(9) if mask[i, t])
        for t in range(9):
            if mask[i, t]:
                expected[i, t] = min(math.exp(seq if level == "sequence" else d[t]), 1.5)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=1e-7)
    if level == "token":
        assert ours[0, 2] == 1 and ours[2, 5] == 1


def test_policy_loss_names_the_non_finite_argument():
    gen = torch.Generator().manual_seed(4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    logp, adv = -torch.rand(2, 4, generator=gen), torch.randn(2, generator=gen)
    bad = logp.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="^logprobs must be finite at the masked"):
        policy_loss(bad, bad.detach(), adv, mask)  # old = current: blamed old_logprobs before
    with pytest.raises(ValueError, match="^logprobs must be finite at the masked"):
        policy_loss(bad, None, adv, mask)
    with pytest.raises(ValueError, match="^is_weights must be finite at the masked"):
        policy_loss(logp, logp, adv, mask, is_weights=torch.where(bad.isnan(), bad, 1.0))
    with pytest.raises(ValueError, match="^is_weights must be >= 0"):
        policy_loss(logp, logp, adv, mask, is_weights=-torch.ones(2, 4))
    with pytest.raises(ValueError, match="^ref_logprobs must be finite at the masked"):
        policy_loss(logp, logp, adv, mask, ref_logprobs=bad, kl_coef=0.1)
    # NaN where the mask is False stays harmless
    loss, _ = policy_loss(bad, logp, adv, mask & ~bad.isnan())
    assert torch.isfinite(loss)


def test_sft_loss_names_normalize():
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(2, 3, 4, generator=gen), torch.randn(7, 4, generator=gen)
    targets = torch.randint(0, 7, (2, 3), generator=gen)
    for bad in (0, 0.0, -2.0, float("inf"), True):
        with pytest.raises(ValueError, match=r"normalize must be 'tokens', 'sequences' or a number > 0, got"):
            sft_loss(hidden, weight, targets, normalize=bad)


# ---------------------------------------------------------------------------------------------
# KL estimators

def test_low_var_kl_is_verl_and_k3_is_unclamped():
    d = torch.tensor([3.0, 0.5, -0.7, -30.0, 29.0], dtype=F64)  # d = ref - logp
    logp = torch.tensor([-4.0, -1.0, -0.2, -0.5, -31.0], dtype=F64, requires_grad=True)
    ref = logp.detach() + d
    ours = kl_penalty(logp, ref, "low_var_kl")
    expected = []
    for x in d.tolist():
        x = min(max(x, -20.0), 20.0)
        expected.append(min(max(math.exp(x) - x - 1, -10.0), 10.0))
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    assert ours[0].item() == 10.0 and kl_penalty(logp, ref, "k3")[0].item() == pytest.approx(math.exp(3) - 4)
    (grad,) = torch.autograd.grad(ours.sum(), logp)
    # d(k3)/d(logp) = 1 - exp(d) inside the clamp, 0 where the value is clamped
    inside = [1 - math.exp(x) if abs(math.exp(x) - x - 1) < 10 else 0.0 for x in d.tolist()]
    torch.testing.assert_close(grad, torch.tensor(inside, dtype=F64), rtol=1e-12, atol=0)
    # k3 itself clamps only d, by log_ratio_limit (None: TRL's, not at all)
    assert kl_penalty(logp, ref, "k3")[4].item() == pytest.approx(math.exp(20) - 21)
    assert kl_penalty(logp, ref, "k3", log_ratio_limit=None)[4].item() == pytest.approx(math.exp(29) - 30)


@pytest.mark.parametrize("estimator,value", [("k1+", lambda x: -x), ("low_var_kl+", None)])
def test_straight_through_estimators_have_the_k2_gradient(estimator, value):
    d = torch.tensor([3.0, 0.5, -0.7], dtype=F64)
    logp = torch.tensor([-4.0, -1.0, -0.2], dtype=F64, requires_grad=True)
    ref = logp.detach() + d
    ours = kl_penalty(logp, ref, estimator)
    base = kl_penalty(logp, ref, estimator[:-1]) if value is None else torch.tensor([value(x) for x in d.tolist()],
                                                                                     dtype=F64)
    torch.testing.assert_close(ours, base.detach())
    (grad,) = torch.autograd.grad(ours.sum(), logp)
    torch.testing.assert_close(grad, -d)  # d/dlogp of (ref - logp)^2 / 2


# ---------------------------------------------------------------------------------------------
# TRL and verl parity

def trl_grpo_loop(logp, old, adv, mask, ref, entropy, *, eps_low, eps_high, beta, entropy_coef, loss_type="grpo"):
    """TRL's GRPO losses with use_bias_correction_kl=True, written from their documented formulas:
    r = exp(logp - old) (no clamp); per token the policy term

        grpo:  -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
        cispo: -sg(min(r, eps_high)) A logp
        sapo:  -(4 / tau) sigmoid(tau (r - 1)) A, tau = 1.0 if A > 0 else 1.05

    + beta * k3 * r with k3 = exp(ref - logp) - (ref - logp) - 1; grpo and sapo: the mean over every
    sequence of its token mean (an empty sequence counts, as 0); cispo: the sum over tokens divided by
    their count; minus entropy_coef times the token mean entropy."""
    seqs, tokens, ent_sum, count = [], [], 0.0, 0
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            r = torch.exp(logp[i, t] - old[i, t])
            a = float(adv[i])
            if loss_type == "cispo":
                pg = -min(r.item(), eps_high) * a * logp[i, t]
            elif loss_type == "sapo":
                tau = 1.0 if a > 0 else 1.05
                pg = -(4 / tau) * torch.sigmoid(tau * (r - 1)) * a
            else:
                pg = -torch.minimum(r * a, r.clamp(1 - eps_low, 1 + eps_high) * a)
            d = ref[i, t] - logp[i, t]
            terms.append(pg + beta * (torch.exp(d) - d - 1) * r)
            ent_sum = ent_sum + entropy[i, t]
            count += 1
        seqs.append(sum(terms) / len(terms) if terms else logp.new_zeros(()))
        tokens += terms
    policy = sum(tokens) / max(count, 1) if loss_type == "cispo" else sum(seqs) / len(seqs)
    return policy - entropy_coef * ent_sum / max(count, 1)


TRL_OPTIONS = {"agg": "seq-mean-token-mean", "count_empty_sequences": True, "kl_estimator": "k3",
               "kl_bias_correction": True, "entropy_agg": "token-mean", "log_ratio_limit": None}


@pytest.mark.parametrize("on_policy", [False, True])
def test_policy_loss_with_trl_options_matches_trl_grpo(on_policy):
    gen = torch.Generator().manual_seed(6)
    mask = ragged_mask()
    logp = (-torch.rand(4, 9, dtype=F64, generator=gen) * 3).requires_grad_()
    old = logp.detach() + torch.randn(4, 9, dtype=F64, generator=gen) * 0.4
    old[0, 0] = logp[0, 0].detach() - 22.0  # beyond the [-20, 20] clamp TRL does not have
    ref = logp.detach() + torch.randn(4, 9, dtype=F64, generator=gen) * 0.5
    entropy = (torch.rand(4, 9, dtype=F64, generator=gen) * 2).requires_grad_()
    adv = torch.tensor([-1.5, -2.0, 0.7, 1.0], dtype=F64)
    loss, _ = policy_loss(logp, None if on_policy else old, adv, mask, clip_high=0.28, ref_logprobs=ref,
                          kl_coef=0.04, entropy=entropy, entropy_coef=0.01, **TRL_OPTIONS)
    expected = trl_grpo_loop(logp, logp.detach() if on_policy else old, adv, mask, ref, entropy, eps_low=0.2,
                             eps_high=0.28, beta=0.04, entropy_coef=0.01)
    assert abs(loss.item() - expected.item()) <= 1e-10 * max(1.0, abs(expected.item()))
    (expected_grad,) = torch.autograd.grad(expected, logp, retain_graph=True)
    for a, b in zip(torch.autograd.grad(loss, (logp, entropy)), torch.autograd.grad(expected, (logp, entropy))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # each option matters here (on policy, the bias correction only in the gradient)
    for name, default in (("count_empty_sequences", False), ("kl_bias_correction", False), ("entropy_agg", None),
                          ("log_ratio_limit", 20.0)):
        if on_policy and name == "log_ratio_limit":
            continue
        other, _ = policy_loss(logp, None if on_policy else old, adv, mask, clip_high=0.28, ref_logprobs=ref,
                               kl_coef=0.04, entropy=entropy, entropy_coef=0.01, **{**TRL_OPTIONS, name: default})
        (other_grad,) = torch.autograd.grad(other, logp)
        assert abs(other.item() - expected.item()) > 1e-6 or (other_grad - expected_grad).abs().max() > 1e-6, name


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_policy_loss_pg_loss_matches_trl_cispo_and_sapo(loss_type):
    gen = torch.Generator().manual_seed(10)
    mask = ragged_mask()
    logp = (-torch.rand(4, 9, dtype=F64, generator=gen) * 3).requires_grad_()
    old = logp.detach() + torch.randn(4, 9, dtype=F64, generator=gen) * 0.6
    old[0, 0] = logp[0, 0].detach() - 2.5  # ratio e^2.5 beyond CISPO's cap 5
    ref = logp.detach() + torch.randn(4, 9, dtype=F64, generator=gen) * 0.5
    entropy = (torch.rand(4, 9, dtype=F64, generator=gen) * 2).requires_grad_()
    adv = torch.tensor([1.5, -2.0, 0.7, 1.0], dtype=F64)
    options = {**TRL_OPTIONS, "agg": "token-mean"} if loss_type == "cispo" else TRL_OPTIONS
    loss, _ = policy_loss(logp, old, adv, mask, clip_high=4.0 if loss_type == "cispo" else 0.2, ref_logprobs=ref,
                          kl_coef=0.04, entropy=entropy, entropy_coef=0.01, pg_loss=loss_type, **options)
    expected = trl_grpo_loop(logp, old, adv, mask, ref, entropy, eps_low=0.2, eps_high=5.0, beta=0.04,
                             entropy_coef=0.01, loss_type=loss_type)
    assert abs(loss.item() - expected.item()) <= 1e-10 * max(1.0, abs(expected.item()))
    for a, b in zip(torch.autograd.grad(loss, (logp, entropy)), torch.autograd.grad(expected, (logp, entropy))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="dual_clip applies to pg_loss='ppo'"):
        policy_loss(logp, old, adv, mask, dual_clip=3.0, pg_loss=loss_type)


def verl_loop(logp, old, adv, mask, ref, entropy, *, clip, clip_c, kl_coef, entropy_coef):
    """verl's vanilla PPO loss (dual clip c, ratio from a log-ratio clamped to [-20, 20]) plus
    kl_coef * low_var_kl (k3 of the clamped d, then clamped to [-10, 10]), minus entropy_coef * entropy,
    each aggregated "seq-mean-token-mean" over the non-empty sequences."""
    def seq_mean_token_mean(values):
        rows = [[values[i][t] for t in range(len(values[i])) if mask[i, t]] for i in range(len(values))]
        rows = [sum(r) / len(r) for r in rows if r]
        return sum(rows) / len(rows)

    pg, kl = [], []
    for i in range(logp.shape[0]):
        pg.append([]), kl.append([])
        for t in range(logp.shape[1]):
            a = float(adv[i])
            r = torch.exp((logp[i, t] - old[i, t]).clamp(-20, 20))
            loss = torch.maximum(-a * r, -a * r.clamp(1 - clip, 1 + clip))
            if a < 0:
                loss = torch.minimum(loss, torch.tensor(-a * clip_c, dtype=F64))
            pg[i].append(loss)
            d = (ref[i, t] - logp[i, t]).clamp(-20, 20)
            kl[i].append((torch.exp(d) - d - 1).clamp(-10, 10))
    ent = [[entropy[i, t] for t in range(logp.shape[1])] for i in range(logp.shape[0])]
    return seq_mean_token_mean(pg) + kl_coef * seq_mean_token_mean(kl) - entropy_coef * seq_mean_token_mean(ent)


def test_policy_loss_with_verl_options_matches_verl():
    gen = torch.Generator().manual_seed(7)
    mask = ragged_mask()
    logp = (-torch.rand(4, 9, dtype=F64, generator=gen) * 3).requires_grad_()
    old = logp.detach() + torch.randn(4, 9, dtype=F64, generator=gen) * 0.4
    old[1, 5] = logp[1, 5].detach() - 2.0  # beyond the dual clip
    ref = logp.detach() + torch.randn(4, 9, dtype=F64, generator=gen) * 0.5
    ref[0, 3] = logp[0, 3].detach() + 3.0  # low_var_kl clamps this token's value to 10
    entropy = (torch.rand(4, 9, dtype=F64, generator=gen) * 2).requires_grad_()
    adv = torch.tensor([1.5, -2.0, 0.7, 1.0], dtype=F64)
    loss, _ = policy_loss(logp, old, adv, mask, dual_clip=3.0, ref_logprobs=ref, kl_coef=0.1,
                          kl_estimator="low_var_kl", entropy=entropy, entropy_coef=0.01, agg="seq-mean-token-mean")
    expected = verl_loop(logp, old, adv, mask, ref, entropy, clip=0.2, clip_c=3.0, kl_coef=0.1, entropy_coef=0.01)
    assert abs(loss.item() - expected.item()) <= 1e-10 * max(1.0, abs(expected.item()))
    for a, b in zip(torch.autograd.grad(loss, (logp, entropy)), torch.autograd.grad(expected, (logp, entropy))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "sapo", "cispo"])
def test_grpo_loss_with_trl_options_matches_trl_in_float64(loss_type):
    """The fused path carries the new options (and the entropy's own aggregation) token by token."""
    from osft_kernels.losses import grpo_loss
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(4, 8, 12, generator=gen).requires_grad_()
    weight = (torch.randn(31, 12, generator=gen) * 0.4).requires_grad_()
    targets = torch.randint(0, 31, (4, 8), generator=gen)
    targets[:, :3] = -100
    targets[1, 6:] = -100
    targets[3, :] = -100  # an empty completion, counted
    old = -torch.rand(4, 7, generator=gen) * 4
    ref = -torch.rand(4, 7, generator=gen) * 4
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    options = dict(ref_logprobs=ref, kl_coef=0.04, entropy_coef=0.01, clip_high=4.0 if loss_type == "cispo" else 0.28,
                   **{**TRL_OPTIONS, "agg": "token-mean"} if loss_type == "cispo" else TRL_OPTIONS)
    if loss_type != "grpo":
        options["pg_loss"] = loss_type
    loss, _ = grpo_loss(hidden, weight, targets, old, adv, shift=True, backend="torch", **options)
    grads = torch.autograd.grad(loss, (hidden, weight))

    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h[:, :-1] @ w.T
    y = targets[:, 1:]
    mask = y != -100
    log_probs = torch.log_softmax(logits, -1)
    logp = log_probs.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    expected = trl_grpo_loop(logp, old.double(), adv.double(), mask, ref.double(), entropy, eps_low=0.2,
                             eps_high=5.0 if loss_type == "cispo" else 0.28, beta=0.04, entropy_coef=0.01,
                             loss_type=loss_type)
    ref_grads = torch.autograd.grad(expected, (h, w))
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


# ---------------------------------------------------------------------------------------------
# num_items across data-parallel ranks

def _ddp_worker(rank, world_size, token_loss, mask, expected):
    import torch.distributed as dist

    from osft_kernels.losses import ddp_num_items
    rows = slice(0, 1) if rank == 0 else slice(1, None)  # ranks with different token counts
    param = torch.ones((), dtype=F64, requires_grad=True)
    local_mask = mask[rows]
    num_items = ddp_num_items(local_mask.sum())
    assert num_items == mask.sum().item() / world_size
    loss = aggregate(param * token_loss[rows], local_mask, "token-mean", num_items=num_items)
    (grad,) = torch.autograd.grad(loss, param)
    dist.all_reduce(grad)
    grad /= world_size  # what DDP does to gradients
    assert abs(grad.item() - expected) <= 1e-12, (grad.item(), expected)


def test_ddp_num_items_with_averaged_gradients_gives_the_full_batch_gradient(tmp_path):
    from osft_kernels.losses import ddp_num_items
    token_loss = torch.randn(4, 9, dtype=F64, generator=torch.Generator().manual_seed(9))
    mask = ragged_mask()
    values = [float(token_loss[i, t]) for i in range(4) for t in range(9) if mask[i, t]]
    expected = sum(values) / len(values)  # d(token mean of param * L)/d(param)
    assert ddp_num_items(7) == 7.0 and ddp_num_items(0) == 1.0  # one process: the count itself
    with pytest.raises(ValueError, match="local_count must be a finite number >= 0"):
        ddp_num_items(-1)
    run_ranks(_ddp_worker, 2, tmp_path, token_loss, mask, expected)


@pytest.mark.parametrize("normalize", ["tokens", "sequences"])
def test_sft_loss_masks_narrow_integer_targets_like_the_ops(normalize):
    """The loss mask compares targets as int64, as the fused ops do: uint8 id 156 is not ignore_index=-100
    (156 as a byte), so it carries loss and counts in the normalization."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8, generator=gen), torch.randn(300, 8, generator=gen)
    targets = torch.tensor([[156, 3, 156, 7, 9], [1, 156, 2, 156, 4]])
    wide = sft_loss(hidden, weight, targets, normalize=normalize, shift=True)
    narrow = sft_loss(hidden, weight, targets.to(torch.uint8), normalize=normalize, shift=True)
    assert torch.equal(narrow, wide)
