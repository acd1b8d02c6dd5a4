"""The verl drop-in (``osft_kernels.integrations.verl``) against a float64 reference written here from the
definitions (materialized logits, ``log_softmax``, entropy), and the hook that swaps it into verl (checked
on stand-in modules: CI does not install verl; ``benchmarks/verl_compare.py`` runs against verl itself)."""
import importlib
import sys
import types

import pytest
import torch
import torch.distributed as dist
from helpers.cases import bf16_grad_tolerance

from osft_kernels.integrations import verl as verl_shim

# (hidden shape, labels shape, vocabulary): verl's packed [1, nnz, D], a padded batch, flat rows, and
# Megatron's [S, 1, D] hidden states with [1, S] labels
SHAPES = [((1, 37, 19), (1, 37), 53), ((3, 5, 7), (3, 5), 11), ((13, 24), (13,), 97), ((9, 1, 16), (1, 9), 130)]
# outputs are float32 statistics of the given (possibly bfloat16) inputs; bfloat16 gradients are rounded
# once from float32, so they are within half a bfloat16 ulp (2**-8 relative) of the exact value
OUT_TOL = {"rtol": 1e-5, "atol_rel": 1e-5}
FLOAT32_GRAD_TOL = {"rtol": 1e-4, "atol_rel": 1e-5}


def reference(hidden, weight, labels, temperature):
    """Float64 ``(logprobs, entropy)`` shaped like ``labels``, differentiable in ``hidden`` and ``weight``."""
    z = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T) / temperature
    logp = torch.log_softmax(z, dim=-1)
    target = logp.gather(-1, labels.reshape(-1, 1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return target.view(labels.shape), entropy.view(labels.shape)


def close(actual, expected, *, rtol, atol_rel, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    excess = ((actual - expected).abs() - rtol * expected.abs()).max().item()
    atol = atol_rel * max(expected.abs().max().item(), 1e-30)
    assert excess <= atol, f"{what}: max excess error {excess:.3g} > {atol:.3g}"


def make(hidden_shape, labels_shape, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(hidden_shape, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_shape[-1], generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, labels_shape, generator=g)
    return hidden, weight, labels, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0])))
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_matches_reference_with_gradients(shapes, dtype, temperature):
    hidden, weight, labels, g = make(*shapes, dtype)
    logprobs, entropy = verl_shim.linear_cross_entropy(hidden, weight, labels, temperature, "none")
    ref_hidden, ref_weight = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref_logprobs, ref_entropy = reference(ref_hidden, ref_weight, labels, temperature)

    assert logprobs.dtype == entropy.dtype == torch.float32
    close(logprobs, ref_logprobs, **OUT_TOL, what="logprobs")
    close(entropy, ref_entropy, **OUT_TOL, what="entropy")

    up_logprobs, up_entropy = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    ours = torch.autograd.grad((logprobs * up_logprobs).sum() + (entropy * up_entropy).sum(), (hidden, weight))
    expected = torch.autograd.grad((ref_logprobs * up_logprobs).sum() + (ref_entropy * up_entropy).sum(),
                                   (ref_hidden, ref_weight))
    for name, a, e in zip(("hidden", "weight"), ours, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        tolerance = FLOAT32_GRAD_TOL if dtype == torch.float32 else bf16_grad_tolerance("auto", hidden.shape[-1])
        close(a, e, **tolerance, what=f"d{name}")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduced_logprobs(reduction):
    hidden, weight, labels, g = make((2, 11, 11), (2, 11), 29, torch.float32)
    logprobs, entropy = verl_shim.linear_cross_entropy(hidden, weight, labels, 0.9, reduction)
    ref_hidden, ref_weight = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref_logprobs, ref_entropy = reference(ref_hidden, ref_weight, labels, 0.9)
    ref_logprobs = getattr(ref_logprobs, reduction)()

    assert logprobs.shape == () and entropy.shape == labels.shape
    close(logprobs, ref_logprobs, **OUT_TOL, what="logprobs")
    up_entropy = torch.randn(labels.shape, generator=g)
    ours = torch.autograd.grad(2.5 * logprobs + (entropy * up_entropy).sum(), (hidden, weight))
    expected = torch.autograd.grad(2.5 * ref_logprobs + (ref_entropy * up_entropy).sum(), (ref_hidden, ref_weight))
    for name, a, e in zip(("hidden", "weight"), ours, expected):
        close(a, e, **FLOAT32_GRAD_TOL, what=f"d{name}")


@pytest.mark.parametrize("used", ["logprobs", "entropy"])
def test_gradient_of_one_output(used):
    """verl's losses may use only one of the outputs (no entropy term): the other gets no upstream gradient."""
    hidden, weight, labels, _ = make((2, 9, 12), (2, 9), 31, torch.float32)
    out = dict(zip(("logprobs", "entropy"), verl_shim.linear_cross_entropy(hidden, weight, labels, 1.3)))
    ref_hidden, ref_weight = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = dict(zip(("logprobs", "entropy"), reference(ref_hidden, ref_weight, labels, 1.3)))
    ours = torch.autograd.grad(out[used].sum(), (hidden, weight))
    expected = torch.autograd.grad(ref[used].sum(), (ref_hidden, ref_weight))
    for name, a, e in zip(("hidden", "weight"), ours, expected):
        close(a, e, **FLOAT32_GRAD_TOL, what=f"d{name}")


def test_positional_call_like_verl():
    """verl's Hugging Face forward passes ``(hidden, weight, rolled_labels, temperature, "none")``; the
    FSDP engine then takes ``.squeeze(0)`` of the ``[1, nnz]`` outputs."""
    hidden, weight, labels, _ = make((1, 6, 8), (1, 6), 17, torch.float32)
    logprobs, entropy = verl_shim.linear_cross_entropy(hidden, weight, torch.roll(labels, -1, -1), 1.0, "NONE")
    assert logprobs.shape == entropy.shape == (1, 6)
    assert logprobs.squeeze(0).shape == (6,)


def test_process_group_of_one_rank_is_accepted():
    """Megatron passes its tensor-parallel group even at tensor-parallel size 1."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    hidden, weight, labels, _ = make((4, 8), (4,), 13, torch.float32)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with_group = verl_shim.linear_cross_entropy(hidden, weight, labels, 1.0, "none", dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    without = verl_shim.linear_cross_entropy(hidden, weight, labels, 1.0, "none")
    for a, b in zip(with_group, without):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("call, error, match", [
    (lambda h, w, y: verl_shim.linear_cross_entropy(h, w, y, 1.0, "none", object()),
     NotImplementedError, "dist_process_group must be None or a process group of one rank.*got object"),
    (lambda h, w, y: verl_shim.linear_cross_entropy(h, w, torch.full_like(y, -100), 1.0),
     ValueError, r"labels must be token ids in \[0, V\) = \[0, 13\).*found -100"),
    (lambda h, w, y: verl_shim.linear_cross_entropy(h, w, y[:-1], 1.0), ValueError, "labels must hold one token id"),
    (lambda h, w, y: verl_shim.linear_cross_entropy(h, w, y.float(), 1.0), TypeError, "labels must be an integer"),
    (lambda h, w, y: verl_shim.linear_cross_entropy(h, w, y, torch.tensor(1.0)), TypeError, "temperature must be a float"),
    (lambda h, w, y: verl_shim.linear_cross_entropy(h, w, y, 0.0), ValueError, "temperature must be a finite number > 0"),
    (lambda h, w, y: verl_shim.linear_cross_entropy(h, w, y, float("inf")), ValueError, "temperature must be a finite"),
    (lambda h, w, y: verl_shim.linear_cross_entropy(h, w, y, 1.0, "avg"), ValueError, "reduction must be one of"),
])
def test_errors_name_the_argument(call, error, match):
    hidden, weight, labels, _ = make((4, 8), (4,), 13, torch.float32)
    with pytest.raises(error, match=match):
        call(hidden, weight, labels)


def test_patch_rebinds_verl_call_sites(monkeypatch):
    """``patch_verl`` (run by importing ``verl_patch``) rebinds the kernel module's function and every loaded
    verl module holding it, and leaves other names alone; stand-in modules play verl's."""
    def verl_kernel(*args):
        raise AssertionError("verl's kernel was called")

    kernel = types.ModuleType("verl.utils.kernel.linear_cross_entropy")
    kernel.linear_cross_entropy = verl_kernel
    megatron = types.ModuleType("verl.models.mcore.model_forward_fused")
    megatron.linear_cross_entropy = verl_kernel
    other = types.ModuleType("verl.other")
    other.linear_cross_entropy = object()
    for name in ("verl", "verl.utils", "verl.utils.kernel", "verl.models", "verl.models.mcore"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for module in (kernel, megatron, other):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.delitem(sys.modules, "osft_kernels.integrations.verl_patch", raising=False)

    importlib.import_module("osft_kernels.integrations.verl_patch")
    assert kernel.linear_cross_entropy is megatron.linear_cross_entropy is verl_shim.linear_cross_entropy
    assert other.linear_cross_entropy is not verl_shim.linear_cross_entropy
    assert verl_shim.patch_verl() == []
