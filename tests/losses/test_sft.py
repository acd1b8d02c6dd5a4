"""osft_kernels.losses.sft (token-weighted SFT, the OSFT objective and its temperature schedule)
against a float64 loop written here, and the property OSFT rests on. Fused paths on float32 inputs
match the float64 reference to 1e-5 relative (losses) and 1e-4 (gradients)."""
import math

import pytest
import torch
from helpers.loss_cases import sft_case

from osft_kernels.losses import (
    sampling_temperature,
    sft_loss,
)


def sft_reference(hidden, weight, targets, *, token_weights=None, temperature=1.0, ignore_index=-100,
                  normalize="tokens", shift=False):
    """Float64 loop over sequences: token NLL of log_softmax(h W^T / temperature), then the normalization;
    ``token_weights`` per target."""
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    h_rows, y, wt = (h[..., :-1, :], targets[..., 1:], token_weights) if shift else (h, targets, token_weights)
    h_rows, y = h_rows.reshape(-1, y.shape[-1], h.shape[-1]), y.reshape(-1, y.shape[-1])
    wt = None if wt is None else wt.reshape(y.shape).double()
    seq_losses, total, count = [], 0.0, 0
    for i in range(y.shape[0]):
        terms = []
        for t in range(y.shape[1]):
            if int(y[i, t]) == ignore_index:
                continue
            logp = torch.log_softmax(h_rows[i, t] @ w.T / temperature, -1)[int(y[i, t])]
            terms.append(-logp * (1.0 if wt is None else wt[i, t]))
        if terms:
            seq_losses.append(sum(terms) / len(terms))
            total = total + sum(terms)
            count += len(terms)
    if normalize == "tokens":
        loss = total / max(count, 1)
    elif normalize == "sequences":
        loss = sum(seq_losses) / max(len(seq_losses), 1) if seq_losses else h.sum() * 0
    else:
        loss = total / normalize
    if not torch.is_tensor(loss):
        loss = h.sum() * 0
    return loss, torch.autograd.grad(loss, (h, w))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("normalize", ["tokens", "sequences", 9.0])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("use_weights", [False, True])
def test_sft_loss_matches_reference(backend, normalize, shift, use_weights):
    hidden, weight, targets, weights = sft_case()
    token_weights = (weights[..., 1:] if shift else weights) if use_weights else None
    kwargs = dict(token_weights=token_weights, temperature=0.8, normalize=normalize, shift=shift)
    loss = sft_loss(hidden, weight, targets, backend=backend, **kwargs)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_loss, ref_grads = sft_reference(hidden, weight, targets, **kwargs)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * r.abs().max().item())


def test_sft_loss_all_ignored_is_zero():
    hidden, weight, targets, _ = sft_case(ignore_all=True)
    for normalize in ("tokens", "sequences"):
        loss = sft_loss(hidden, weight, targets, normalize=normalize)
        grads = torch.autograd.grad(loss, (hidden, weight))
        assert loss.item() == 0.0 and not any(g.any() for g in grads)


def test_sft_loss_micro_batches_with_num_items_sum_to_the_full_batch():
    hidden, weight, targets, _ = sft_case(seed=3)
    for normalize, count in (("tokens", int((targets != -100).sum())), ("sequences", 3)):
        full = torch.autograd.grad(sft_loss(hidden, weight, targets, normalize=normalize), (hidden, weight))
        parts = [torch.autograd.grad(sft_loss(hidden[s], weight, targets[s], normalize=normalize, num_items=count),
                                     (hidden, weight)) for s in (slice(0, 1), slice(1, 3))]
        for i in range(2):
            torch.testing.assert_close(parts[0][i] + parts[1][i], full[i], rtol=1e-5, atol=1e-7)


def test_sft_loss_arguments_are_checked():
    hidden, weight, targets, _ = sft_case()
    with pytest.raises(ValueError, match="normalize must be 'tokens', 'sequences' or a number > 0"):
        sft_loss(hidden, weight, targets, normalize="batch")
    with pytest.raises(ValueError, match="normalize must be .tokens., .sequences. or a number > 0, got 0.0"):
        sft_loss(hidden, weight, targets, normalize=0.0)
    with pytest.raises(ValueError, match="num_items applies to normalize='tokens' or 'sequences'"):
        sft_loss(hidden, weight, targets, normalize=4.0, num_items=3)
    with pytest.raises(ValueError, match=r"token_weights must have the shape of the per-token outputs \(3, 6\)"):
        sft_loss(hidden, weight, targets, token_weights=torch.ones(3, 7), shift=True)


@pytest.mark.parametrize("shift", [False, True])
def test_sft_loss_deprecated_weights_are_shaped_like_targets(shift):
    hidden, weight, targets, weights = sft_case()
    expected = sft_loss(hidden, weight, targets, token_weights=weights[..., 1:] if shift else weights, shift=shift)
    with pytest.warns(DeprecationWarning, match="weights= is deprecated: pass token_weights="):
        loss = sft_loss(hidden, weight, targets, weights=weights, shift=shift)
    assert torch.equal(loss, expected)


def test_sampling_temperature_schedule():
    assert sampling_temperature(0.0) == pytest.approx(0.6)
    assert sampling_temperature(1.0) == pytest.approx(0.8)
    assert sampling_temperature(2.0) == pytest.approx(1.0)
    assert sampling_temperature(2.7) == pytest.approx(1.0)
    assert sampling_temperature(0.5, start=0.9) == pytest.approx(0.925)
    assert sampling_temperature(1.3, start=0.6, end=0.6) == pytest.approx(0.6)  # v1: constant
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        sampling_temperature(-1.0)
    with pytest.raises(ValueError, match="anneal_epochs must be > 0"):
        sampling_temperature(1.0, anneal_epochs=0)


def osft_logit_gradient(z, tau_s, tau_t, samples, seed):
    """Monte-Carlo mean of the OSFT gradient wrt the logits ``z [V]`` of a categorical model, computed
    through ``sft_loss`` with hidden = 1 and weight = z (so the logits are exactly z)."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.multinomial(torch.softmax(z / tau_s, -1), samples, replacement=True, generator=gen)
    weight = z[:, None].clone().requires_grad_()
    loss = sft_loss(torch.ones(samples, 1), weight, targets, temperature=tau_t)
    (grad,) = torch.autograd.grad(loss, weight)
    return grad[:, 0].double()


def test_osft_expected_gradient_is_zero_when_temperatures_match():
    """Per sample the logit gradient is (p - onehot(y)) / tau_t: each component has standard deviation
    sqrt(p_j (1 - p_j)) / tau_t, so the mean over M samples lies within 5 of those over sqrt(M)
    (a 6e-7 chance per component of failing for a correct implementation; the seed is fixed)."""
    z = torch.tensor([2.0, 1.0, 0.3, -0.5, -2.0])
    samples = 200_000
    for tau in (1.0, 0.7):
        grad = osft_logit_gradient(z, tau, tau, samples, seed=0)
        p = torch.softmax(z.double() / tau, -1)
        bound = 5 * (p * (1 - p)).sqrt() / tau / math.sqrt(samples)
        assert (grad.abs() <= bound).all(), (grad, bound)
        # and the same estimator does see a nonzero gradient when the temperatures differ
        sharpening = osft_logit_gradient(z, 0.6 * tau, tau, samples, seed=0)
        assert sharpening.abs().max() > 20 * bound.max()


def test_osft_step_with_lower_sampling_temperature_sharpens():
    """tau_s < tau_t: the expected gradient is (p_tau_t - p_tau_s) / tau_t; one descent step
    increases the margin between the top logit and every other one."""
    z = torch.tensor([2.0, 1.0, 0.3, -0.5, -2.0])
    grad = osft_logit_gradient(z, 0.6, 1.0, 200_000, seed=1)
    expected = (torch.softmax(z.double(), -1) - torch.softmax(z.double() / 0.6, -1))
    torch.testing.assert_close(grad, expected, rtol=0, atol=0.01)
    stepped = z.double() - 1.0 * grad
    margins_before, margins_after = z[0] - z[1:], stepped[0] - stepped[1:]
    assert (margins_after > margins_before.double()).all()
