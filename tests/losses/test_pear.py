"""osft_kernels.losses.pear against a float64 loop written here from the paper's definitions: the
weights to 1e-10 on float64 inputs, the fused loss against the reference backend and the definition."""
import math

import pytest
import torch
from helpers.loss_cases import F64, aggregate_loop, ragged_mask, sft_case

from osft_kernels.losses import (
    pear_loss,
    pear_weights,
)


def pear_loop(logp_current, logp_behavior, mask, level, block_size, gamma, ratio_clip, weight_clip):
    out = torch.zeros_like(logp_current, dtype=F64)
    for i in range(mask.shape[0]):
        idx = [t for t in range(mask.shape[1]) if mask[i, t]]
        d = [min(max(float(logp_current[i, t] - logp_behavior[i, t]), ratio_clip[0]), ratio_clip[1]) for t in idx]
        T = len(idx)
        for pos in range(1, T + 1):  # 1-based position in the response
            if level == "sequence":
                log_g = sum(d)
            elif level == "token":
                log_g = (T - pos) * math.log(gamma) + sum(d[pos:])
            else:
                j = (pos - 1) // block_size
                end = min((j + 1) * block_size, T)
                log_g = (T - end) * math.log(gamma) + sum(d[(j + 1) * block_size:])
            out[i, idx[pos - 1]] = math.exp(min(max(log_g, weight_clip[0]), weight_clip[1]))
    return out


@pytest.mark.parametrize("level,block_size", [("token", 4), ("sequence", 4), ("block", 1), ("block", 2),
                                              ("block", 3), ("block", 4)])
@pytest.mark.parametrize("gamma,clips", [(0.9, ((-0.08, 0.3), (-10.0, 5.0))), (1.0, ((-0.08, 0.3), (-0.3, 0.2)))])
def test_pear_weights_match_loop(level, block_size, gamma, clips):
    gen = torch.Generator().manual_seed(2)
    mask = ragged_mask()
    current = torch.randn(4, 9, dtype=F64, generator=gen) * 0.2
    behavior = torch.randn(4, 9, dtype=F64, generator=gen) * 0.2
    # row 0: huge positive log-ratios at t = 1, 2 and huge negative ones at t = 5..8 hit the ratio
    # clip at both ends; with the tight weight clip, token 0's suffix sum (0.6 - 0.32) and token 3's
    # (-0.32) then hit the weight clip at both ends too
    current[0, 1:3], behavior[0, 1:3] = 0.0, -50.0
    current[0, 3:5] = behavior[0, 3:5]
    current[0, 5:9], behavior[0, 5:9] = -50.0, 0.0
    current[~mask] = float("nan")  # padding values must not matter
    weights = pear_weights(current, behavior, mask, level=level, block_size=block_size, gamma=gamma,
                           log_ratio_clip=clips[0], log_weight_clip=clips[1])
    expected = pear_loop(current, behavior, mask, level, block_size, gamma, *clips)
    assert weights.dtype == torch.float32 and not weights.requires_grad
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-7)
    assert not weights[3].any()  # the empty row
    if level == "token" and clips[1] == (-0.3, 0.2):
        assert weights[0, 0].item() == pytest.approx(math.exp(0.2))
        assert weights[0, 3].item() == pytest.approx(math.exp(-0.3))


def test_pear_weights_arguments_are_checked():
    lp, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="must have the same shape"):
        pear_weights(lp, torch.zeros(2, 4), mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        pear_weights(lp, lp, mask[:, :2])
    with pytest.raises(ValueError, match="level must be one of"):
        pear_weights(lp, lp, mask, level="episode")
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        pear_weights(lp, lp, mask, level="block", block_size=0)
    with pytest.raises(ValueError, match=r"gamma must be a number in \(0, 1\]"):
        pear_weights(lp, lp, mask, gamma=1.5)
    with pytest.raises(ValueError, match="log_ratio_clip must be a pair"):
        pear_weights(lp, lp, mask, log_ratio_clip=(0.3, -0.08))
    with pytest.raises(ValueError, match="must be finite at the masked"):
        pear_weights(torch.full((2, 3), float("nan")), lp, mask)


@pytest.mark.parametrize("shift", [False, True])
def test_pear_loss_fused_matches_reference_backend_and_definition(shift):
    hidden, weight, targets, _ = sft_case(seed=4)
    out_len = targets.shape[1] - 1 if shift else targets.shape[1]
    behavior = -torch.rand(3, out_len, generator=torch.Generator().manual_seed(5)) * 4
    results = []
    for backend in ("torch", "reference"):
        loss = pear_loss(hidden, weight, targets, behavior, level="block", block_size=2, shift=shift,
                         normalize="sequences", backend=backend)
        results.append((loss, torch.autograd.grad(loss, (hidden, weight))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the definition: PEAR weights from the current logprobs, times the per-sequence token mean of the NLL
    from osft_kernels import linear_logprobs
    logprobs = linear_logprobs(hidden, weight, targets, shift=shift).logprobs.detach()
    mask = (targets[:, 1:] if shift else targets) != -100
    w = pear_weights(logprobs, behavior, mask, level="block", block_size=2)
    expected = aggregate_loop(-(w * logprobs).double(), mask, "seq-mean-token-mean")
    assert abs(results[0][0].item() - expected) <= 1e-5 * abs(expected)
    # return_weights: the same loss, and the weights it used (detached, 0 at ignored targets)
    loss, weights = pear_loss(hidden, weight, targets, behavior, level="block", block_size=2, shift=shift,
                              normalize="sequences", return_weights=True)
    assert loss.item() == results[0][0].item() and not weights.requires_grad
    torch.testing.assert_close(weights, w, rtol=1e-6, atol=0)
