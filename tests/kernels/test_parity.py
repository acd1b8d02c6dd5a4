"""Forward and gradient parity of the reference, torch and cpu backends against the float64 reference,
over odd shapes, dtypes and feature combinations (tolerances in ``cases.py``)."""
import pytest
import torch
from helpers.cases import FEATURES, bf16_grad_tolerance, check_cross_entropy, check_logprobs_and_entropy, make_case

from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.backends import cpu
from osft_kernels.driver import ROW_ALIGN, VOCAB_BLOCK

# (leading dims, D, V): no dimension is a multiple of a block size, V = 1 and V < block included
SHAPES = [((37,), 16, 1), ((29,), 24, 7), ((3, 41), 33, 1000), ((2, 35), 20, 32003), ((1,), 9, 1000)]
DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = ["reference", "torch", "torch-small-chunks", "cpu", "cpu-small-chunks"]


def small_budget(vocab_size: int, align: int = ROW_ALIGN, entry_bytes: int = 12) -> int:
    """Forces several token chunks, and several vocabulary chunks when V > 2 blocks."""
    return entry_bytes * align * min(vocab_size, VOCAB_BLOCK) * 2


def backend_kwargs(backend, v):
    if backend == "torch-small-chunks":
        return {"backend": "torch", "memory_budget": small_budget(v)}
    if backend == "cpu-small-chunks":
        return {"backend": "cpu", "memory_budget": small_budget(v, cpu.extension()[1], 6)}
    return {"backend": backend}



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,v", SHAPES)
def test_logprobs_and_entropy(lead, d, v, dtype, feature, backend):
    check_logprobs_and_entropy(make_case(lead, d, v, dtype, FEATURES[feature]), bf16_grad_tolerance(backend, d),
                               **backend_kwargs(backend, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,v", SHAPES)
def test_cross_entropy(lead, d, v, dtype, feature, reduction, backend):
    check_cross_entropy(make_case(lead, d, v, dtype, FEATURES[feature]), reduction, bf16_grad_tolerance(backend, d),
                        **backend_kwargs(backend, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_without_grad_matches(backend):
    """The forward-only path (no gradient wanted) gives the same losses as the training path."""
    case = make_case((4, 33), 24, 3001, torch.float32, FEATURES["everything"])
    args = (case["hidden"], case["weight"], case["targets"])
    kwargs = dict(token_weights=case["token_weights"], **case["kwargs"], **case["ce_kwargs"],
                  **backend_kwargs(backend, 3001))
    for reduction in ("sum", "mean"):
        with torch.no_grad():
            inference = linear_cross_entropy(*args, reduction=reduction, **kwargs)
        training = linear_cross_entropy(*args, reduction=reduction, **kwargs)
        torch.testing.assert_close(inference, training, rtol=1e-6, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.full((3, 5), -100)
    for reduction in ("mean", "sum"):
        loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(hidden.grad, torch.zeros_like(hidden))
        assert torch.equal(weight.grad, torch.zeros_like(weight))
        hidden.grad = weight.grad = None
    out = linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert not out.logprobs.any() and not out.entropy.any()


def test_backward_twice_with_retained_graph_accumulates():
    hidden = torch.randn(40, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (40,))
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    once = weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(weight.grad, 2 * once)


def test_nonfinite_inputs_are_not_hidden():
    """A NaN/inf in a computed row reaches that row's outputs and the loss; other rows stay exact."""
    hidden = torch.randn(6, 8)
    weight = torch.randn(20, 8)
    targets = torch.randint(0, 20, (6,))
    clean = linear_logprobs(hidden, weight, targets).logprobs
    for bad in (float("nan"), float("inf")):
        poisoned = hidden.clone()
        poisoned[2, 3] = bad
        out = linear_logprobs(poisoned, weight, targets, return_entropy=True)
        assert out.logprobs[2].isnan() or out.logprobs[2].isinf()
        assert torch.equal(out.logprobs[[0, 1, 3, 4, 5]], clean[[0, 1, 3, 4, 5]])
        assert not torch.isfinite(linear_cross_entropy(poisoned, weight, targets))
    poisoned_weight = weight.clone()
    poisoned_weight[7, 0] = float("nan")
    assert linear_cross_entropy(hidden, poisoned_weight, targets).isnan()
    # an ignored row is not computed, so its values cannot matter
    poisoned = hidden.clone()
    poisoned[2] = float("nan")
    ignored = targets.clone()
    ignored[2] = -100
    assert torch.isfinite(linear_cross_entropy(poisoned, weight, ignored))
