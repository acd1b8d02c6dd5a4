"""Inputs that once gave silently wrong answers on some backend: each now gives the float64 reference's
answer or a clear error. The triton backend runs in Triton's interpreter without CUDA (``conftest.py``)."""
import math

import numpy as np
import pytest
import torch
from helpers.cases import assert_close, assert_grads_close, bf16_grad_tolerance
from helpers.reference64 import reference

from osft_kernels import linear_cross_entropy, linear_logprobs

BACKENDS = ["reference", "torch", "triton", "cpu"]
CHUNKED = ["torch", "triton", "cpu"]


def skip_without_triton(backend):
    if backend == "triton":
        pytest.importorskip("triton")


def leaves(n, d, v, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5).to(dtype).requires_grad_()
    return hidden, weight, torch.randint(0, v, (n,), generator=gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edited", ["targets", "temperature"])
def test_in_place_edit_before_backward_raises(backend, edited):
    """Backward needs the targets and temperature of the forward: editing the caller's tensors in between
    is caught by autograd's version check instead of giving gradients of other targets."""
    skip_without_triton(backend)
    hidden, weight, targets = leaves(7, 12, 300)
    temperature = torch.full((7,), 0.8)
    out = linear_logprobs(hidden, weight, targets, temperature=temperature, return_entropy=True, backend=backend)
    if edited == "targets":
        targets[0] = (targets[0] + 1) % 300
    else:
        temperature.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.logprobs.sum() + out.entropy.sum()).backward()


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("op", ["logprobs", "cross_entropy_mean"])
def test_double_backward_is_refused_by_the_chunked_backends(backend, op):
    """Their gradients are formed outside autograd: ``create_graph=True`` raises instead of returning a
    gradient without a graph (a gradient penalty would silently add nothing)."""
    skip_without_triton(backend)
    hidden, weight, targets = leaves(7, 12, 300)
    if op == "logprobs":
        loss = linear_logprobs(hidden, weight, targets, backend=backend).logprobs.sum()
    else:
        loss = linear_cross_entropy(hidden, weight, targets, backend=backend)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\).*not supported"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_double_backward_of_the_reference_backend_matches_float64():
    """A gradient penalty through ``backend="reference"`` differentiates the gradient exactly."""
    hidden, weight, targets = leaves(5, 6, 40, dtype=torch.float64)

    def penalty_grad(logprobs_of):
        g, = torch.autograd.grad(logprobs_of(hidden, weight).sum(), hidden, create_graph=True)
        return torch.autograd.grad((g ** 2).sum(), weight)[0]

    ours = penalty_grad(lambda h, w: linear_logprobs(h, w, targets, backend="reference").logprobs)
    expected = penalty_grad(lambda h, w: reference(h, w, targets)["logprobs"])
    assert_close(ours, expected, rtol=1e-10, atol_rel=1e-12, what="d(penalty)/dweight")


@pytest.mark.parametrize("backend", CHUNKED)
def test_torch_func_transforms_are_refused_by_the_chunked_backends(backend):
    skip_without_triton(backend)
    hidden, weight, targets = leaves(5, 6, 40)
    loss = lambda h: linear_logprobs(h, weight.detach(), targets, backend=backend).logprobs.sum()
    with pytest.raises(RuntimeError, match="do not support torch.func transforms"):
        torch.func.grad(loss)(hidden.detach())


def masked_case(dtype):
    """V = 5000 with every column of the second 2048-column block and a few others masked by a -inf bias;
    targets avoid the masked columns."""
    hidden, weight, _ = leaves(9, 16, 5000, dtype=dtype, seed=3)
    masked = torch.zeros(5000, dtype=torch.bool)
    masked[2048:4096] = True
    masked[[0, 7, 4999]] = True
    bias = torch.where(masked, -math.inf, torch.randn(5000, generator=torch.Generator().manual_seed(4)))
    unmasked = (~masked).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(5)
    targets = unmasked[torch.randint(0, unmasked.numel(), (9,), generator=gen)]
    targets[4] = -100
    return hidden, weight, bias.to(dtype).requires_grad_(), targets, masked


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minus_inf_bias_entries_count_as_probability_zero(backend, dtype):
    """Vocabulary masking by ``-inf`` bias: logprobs, entropy and gradients (any upstream gradient, entropy
    included) equal the float64 reference over the unmasked vocabulary, with zero gradient for masked rows."""
    skip_without_triton(backend)
    hidden, weight, bias, targets, masked = masked_case(dtype)
    out = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, temperature=0.9, backend=backend)

    keep = (~masked).nonzero().squeeze(1)
    column = torch.full((5000,), -1, dtype=torch.long)
    column[keep] = torch.arange(keep.numel())
    ref_params = [hidden.detach().double().requires_grad_(), weight.detach()[keep].double().requires_grad_(),
                  bias.detach()[keep].double().requires_grad_()]
    ref = reference(ref_params[0], ref_params[1], torch.where(targets >= 0, column[targets.clamp(min=0)], -100),
                    bias=ref_params[2], temperature=0.9)
    assert_close(out.logprobs, ref["logprobs"], rtol=1e-5, atol_rel=1e-5, what="logprobs")
    assert_close(out.entropy, ref["entropy"], rtol=1e-5, atol_rel=1e-5, what="entropy")

    up = torch.linspace(-1.0, 2.0, 9)
    ours = torch.autograd.grad((out.logprobs * up).sum() + (out.entropy * up.flip(0)).sum(), [hidden, weight, bias])
    expected = torch.autograd.grad((ref["logprobs"] * up).sum() + (ref["entropy"] * up.flip(0)).sum(), ref_params)
    assert not ours[1][masked].any() and not ours[2][masked].any()
    assert_grads_close((ours[0], ours[1][keep], ours[2][keep]), expected, dtype, "masked vocabulary",
                       bf16_grad_tolerance(backend, hidden.shape[-1]))


def test_minus_inf_bias_in_the_fused_triton_forward():
    """The fused Triton forward (``memory_budget=0``, no gradients) gives the same statistics."""
    pytest.importorskip("triton")
    hidden, weight, bias, targets, _ = masked_case(torch.float32)
    kwargs = dict(bias=bias.detach(), return_entropy=True)
    with torch.no_grad():
        fused = linear_logprobs(hidden.detach(), weight.detach(), targets, backend="triton", memory_budget=0, **kwargs)
        expected = linear_logprobs(hidden.detach().double(), weight.detach().double(), targets, backend="reference",
                                   bias=bias.detach().double(), return_entropy=True)
    assert_close(fused.logprobs, expected.logprobs, rtol=1e-5, atol_rel=1e-5, what="logprobs")
    assert_close(fused.entropy, expected.entropy, rtol=1e-5, atol_rel=1e-5, what="entropy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=str)
def test_narrow_integer_targets_do_not_wrap(backend, dtype):
    """Ids compare as int64: uint8 id 156 is not ``ignore_index=-100`` (156 as a byte), and every id of a
    type's range below V is accepted, whatever the type."""
    skip_without_triton(backend)
    info = torch.iinfo(dtype)
    v = min(info.max + 1, 300)
    hidden, weight, _ = leaves(6, 8, v)
    ids = torch.tensor([156 % v, v - 1, 0, 1, v // 2, 127], dtype=torch.long)
    narrow = linear_logprobs(hidden, weight, ids.to(dtype), backend=backend).logprobs
    wide = linear_logprobs(hidden, weight, ids, backend=backend).logprobs
    assert torch.equal(narrow, wide) and bool((wide != 0).all())


def test_wide_ignore_index_does_not_match_a_narrow_type():
    """int32 targets with ``ignore_index = 2**32 - 100``: a -100 target is an invalid id, not ignored."""
    hidden, weight, _ = leaves(3, 8, 20)
    targets = torch.tensor([1, -100, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"targets must be in \[0, V\).*found -100 at position \(1,\)"):
        linear_logprobs(hidden, weight, targets, ignore_index=2**32 - 100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_float32_inside_autocast(backend):
    """A forward inside a bfloat16 autocast region still computes and returns float32, bitwise as outside
    (backward outside the region, as torch.autocast asks)."""
    skip_without_triton(backend)
    hidden, weight, targets = leaves(7, 12, 300)
    kwargs = dict(return_entropy=True, backend=backend)
    outside = linear_logprobs(hidden, weight, targets, **kwargs)
    grads_outside = torch.autograd.grad(outside.logprobs.sum() + outside.entropy.sum(), [hidden, weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = linear_logprobs(hidden, weight, targets, **kwargs)
        loss = linear_cross_entropy(hidden, weight, targets, backend=backend)
    grads_inside = torch.autograd.grad(inside.logprobs.sum() + inside.entropy.sum(), [hidden, weight])
    assert inside.logprobs.dtype == inside.entropy.dtype == loss.dtype == torch.float32
    assert torch.equal(inside.logprobs, outside.logprobs) and torch.equal(inside.entropy, outside.entropy)
    assert all(torch.equal(a, b) for a, b in zip(grads_inside, grads_outside))


@pytest.mark.parametrize("argument,value,message", [
    ("temperature", 1e-300, r"temperature must be between 1.18e-38 and 3.4e\+38 \(the normal numbers of the "
                            r"compute dtype torch.float32\), got 1e-300"),
    ("temperature", 1e39, "temperature must be between"),
    ("temperature", torch.tensor([1.0, 1e-300, 1.0], dtype=torch.float64), "temperature tensor must be between"),
    ("softcap", 1e300, "softcap must be between"),
])
def test_numbers_are_checked_in_the_compute_dtype(argument, value, message):
    """A float32 computation sees 1e-300 as 0 and 1e300 as inf: refused, where float64 inputs accept them."""
    hidden, weight, targets = leaves(3, 8, 20)
    with pytest.raises(ValueError, match=message):
        linear_logprobs(hidden, weight, targets, **{argument: value})
    out = linear_logprobs(hidden.double(), weight.double(), targets, **{argument: value}).logprobs
    assert bool(torch.isfinite(out).all())


def test_ignore_index_beyond_int64_is_named():
    hidden, weight, targets = leaves(3, 8, 20)
    with pytest.raises(ValueError, match=r"ignore_index must fit in int64"):
        linear_logprobs(hidden, weight, targets, ignore_index=2**70)


def test_numpy_integer_memory_budget_is_accepted():
    hidden, weight, targets = leaves(3, 8, 20)
    expected = linear_logprobs(hidden, weight, targets, backend="torch", memory_budget=2**20).logprobs
    ours = linear_logprobs(hidden, weight, targets, backend="torch", memory_budget=np.int64(2**20)).logprobs
    assert torch.equal(ours, expected)


def test_meta_tensors_are_refused_by_name():
    hidden, weight, targets = (x.detach().to("meta") for x in leaves(3, 8, 20))
    with pytest.raises(NotImplementedError, match="hidden is a meta tensor"):
        linear_logprobs(hidden, weight, targets)


@pytest.mark.parametrize("backend,memory_budget", [("torch", None), ("triton", None), ("triton", 0)],
                         ids=["torch", "triton", "triton-fused-forward"])
@pytest.mark.parametrize("softcap", [1e4, 1e6, 1e8])
def test_large_softcap_is_accurate(backend, memory_budget, softcap):
    """``softcap * tanh(s / softcap)`` for tiny ``s / softcap``: a tanh that cancels there (``(1 - e) / (1 + e)``)
    once gave logprob errors of 7e-4 at softcap 1e4 and 6.9 at 1e8."""
    skip_without_triton(backend)
    hidden, weight, targets = (x.detach() for x in leaves(9, 16, 700, seed=7))
    with torch.no_grad():
        ours = linear_logprobs(hidden, weight, targets, softcap=softcap, return_entropy=True, backend=backend,
                               memory_budget=memory_budget)
    expected = reference(hidden, weight, targets, softcap=softcap)
    assert_close(ours.logprobs, expected["logprobs"], rtol=1e-5, atol_rel=1e-5, what="logprobs")
    assert_close(ours.entropy, expected["entropy"], rtol=1e-5, atol_rel=1e-5, what="entropy")
