"""osft_kernels.losses.aggregation against a float64 loop over sequences and tokens written from the
documented formulas (no code under test): to 1e-10 on float64 inputs."""

import pytest
import torch
from helpers.loss_cases import F64, aggregate_loop, ragged_mask

from osft_kernels.losses import (
    aggregate,
    aggregation_weights,
    count_items,
)


@pytest.mark.parametrize("agg,num_items", [
    (agg, num_items) for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                                 "constant")
    for num_items in (None, 7.0) if not (agg == "constant" and num_items)])  # refused, tested below
def test_aggregate_matches_loop(agg, num_items):
    loss = torch.randn(4, 9, dtype=F64, generator=torch.Generator().manual_seed(1))
    mask = ragged_mask()
    loss[~mask] = float("nan")  # masked values must not matter
    ours = aggregate(loss, mask, agg, num_items=num_items, norm_length=5.0 if agg == "constant" else None)
    expected = aggregate_loop(loss, mask, agg, num_items, 5.0 if agg == "constant" else None)
    assert abs(float(ours) - expected) <= 1e-12


def test_aggregate_of_empty_batch_is_zero_with_zero_grad():
    loss = torch.randn(3, 4, dtype=F64, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        out = aggregate(loss, mask, agg)
        (grad,) = torch.autograd.grad(out, loss)
        assert out.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("count_empty", [False, True])
def test_count_items_is_what_each_aggregation_divides_by(count_empty):
    """count_items, hand-counted on the ragged mask (rows of 9, 4, 5 and 0 tokens), and as num_items it
    leaves each aggregation unchanged; micro-batches given the whole batch's count sum to its loss."""
    mask = ragged_mask()
    expected = {"token-mean": 18.0, "seq-mean-token-mean": 4.0 if count_empty else 3.0,
                "seq-mean-token-sum": 4.0 if count_empty else 3.0, "seq-mean-token-sum-norm": 4.0}
    loss = torch.randn(4, 9, dtype=F64, generator=torch.Generator().manual_seed(2))
    for agg, count in expected.items():
        assert count_items(mask, agg, count_empty_sequences=count_empty) == count
        whole = aggregate(loss, mask, agg, count_empty_sequences=count_empty)
        assert float(aggregate(loss, mask, agg, num_items=count)) == pytest.approx(float(whole), abs=1e-12)
        parts = sum(float(aggregate(loss[rows], mask[rows], agg, num_items=count))
                    for rows in (slice(0, 1), slice(1, 4)))
        assert parts == pytest.approx(float(whole), abs=1e-12)
    empty = torch.zeros(2, 5, dtype=torch.bool)
    assert [count_items(empty, agg) for agg in expected] == [1.0, 1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="agg='constant' divides by norm_length"):
        count_items(mask, "constant")
    with pytest.raises(ValueError, match="agg must be one of"):
        count_items(mask, "mean")


def test_aggregation_arguments_are_checked():
    mask = ragged_mask()
    with pytest.raises(ValueError, match="agg must be one of"):
        aggregation_weights(mask, "mean")
    with pytest.raises(ValueError, match="num_items must be a finite number > 0"):
        aggregation_weights(mask, "token-mean", num_items=0)
    with pytest.raises(ValueError, match="num_items has no meaning for agg='constant'"):
        aggregation_weights(mask, "constant", num_items=3)
