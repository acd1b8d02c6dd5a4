"""Inputs and float64 loops shared by the tests of several losses."""
import torch

F64 = torch.float64


def ragged_mask():
    """Four rows of 9: full, one with a prompt before and padding after, one with a hole, one empty."""
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[0] = True
    mask[1, 3:7] = True          # prompt before, padding after
    mask[2, [0, 1, 4, 5, 6]] = True  # a hole in the middle
    # row 3 stays empty
    return mask


def aggregate_loop(loss, mask, agg, num_items=None, norm_length=None):
    """Float64 loop of :func:`osft_kernels.losses.aggregate` over rows and tokens."""
    rows = [[float(loss[i, t]) for t in range(loss.shape[1]) if mask[i, t]] for i in range(loss.shape[0])]
    nonempty = [r for r in rows if r]
    length = norm_length or loss.shape[1]
    if agg == "token-mean":
        count = num_items or max(sum(len(r) for r in rows), 1)
        return sum(sum(r) for r in rows) / count
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in nonempty) / (num_items or max(len(nonempty), 1))
    if agg == "seq-mean-token-sum":
        return sum(sum(r) for r in nonempty) / (num_items or max(len(nonempty), 1))
    if agg == "seq-mean-token-sum-norm":
        return sum(sum(r) for r in rows) / ((num_items or len(rows)) * length)
    return sum(sum(r) for r in rows) / length  # constant


def sft_case(seed=0, ignore_all=False):
    """``(hidden [3, 7, 10], weight [23, 10], targets [3, 7] with ignored tokens, weights [3, 7])``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 10, generator=gen).requires_grad_()
    weight = (torch.randn(23, 10, generator=gen) * 0.5).requires_grad_()
    targets = torch.randint(0, 23, (3, 7), generator=gen)
    targets[0, :3] = -100
    targets[2, 5:] = -100
    if ignore_all:
        targets[:] = -100
    weights = torch.rand(3, 7, generator=gen) * 2
    return hidden, weight, targets, weights


def logprob_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask, trainer, rollout)``: :func:`ragged_mask` and two float64 ``[4, 9]`` logprob-like grids."""
    gen = torch.Generator().manual_seed(seed)
    trainer = torch.randn(4, 9, dtype=F64, generator=gen) * 0.3
    return ragged_mask(), trainer, torch.randn(4, 9, dtype=F64, generator=gen) * 0.3
