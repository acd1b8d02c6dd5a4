"""Forward and gradient parity of every backend against the float64 reference, over odd shapes,
dtypes and feature combinations.

Tolerances (elementwise ``|ours - ref| <= atol + rtol * |ref|``, with ``atol`` relative to the
largest reference magnitude): outputs are float32 for every input dtype and are compared at
``rtol = atol = 1e-5``; float32 gradients at ``rtol = 1e-4, atol = 1e-5 * max|ref|``; bfloat16
gradients are rounded once from float32 accumulators, so they must be within 2**-8 relative
(one bf16 ulp is 2**-7, round-to-nearest gives half of it) plus ``1e-4 * max|ref|``.
"""
import pytest
import torch
from reference64 import reference

from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.backends.torch_chunked import ROW_ALIGN, VOCAB_BLOCK

# (leading dims, D, V): no dimension is a multiple of a block size, V = 1 and V < block included
SHAPES = [((37,), 16, 1), ((29,), 24, 7), ((3, 41), 33, 1000), ((2, 35), 20, 32003), ((1,), 9, 1000)]
DTYPES = [torch.float32, torch.bfloat16]
FEATURES = {
    "plain": {},
    "bias": {"bias": True},
    "temperature": {"temperature": 0.7},
    "row-temperature": {"temperature": "rows", "ignore": 0.3},
    "softcap": {"softcap": 2.5, "bias": True, "temperature": "rows"},
    "ignored": {"ignore": 0.4},
    "all-ignored": {"ignore": 1.0},
    "shift": {"shift": True, "ignore": 0.2, "temperature": "rows"},
    "smoothing": {"label_smoothing": 0.1, "z_loss": 1e-3, "weights": True, "ignore": 0.2},
    "everything": {"label_smoothing": 0.2, "z_loss": 1e-2, "weights": True, "softcap": 3.0, "bias": True,
                   "temperature": "rows", "shift": True, "ignore": 0.2},
}
BACKENDS = ["reference", "torch", "torch-small-chunks"]


def small_budget(vocab_size: int) -> int:
    """Forces several token chunks, and several vocabulary chunks when V > 2 blocks."""
    return 3 * 4 * ROW_ALIGN * min(vocab_size, VOCAB_BLOCK) * 2


def make_case(lead, d, v, dtype, features, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    case = {
        "hidden": rand(*lead, d).to(dtype).requires_grad_(),
        "weight": (rand(v, d) * 2 / d ** 0.5).to(dtype).requires_grad_(),
        "targets": torch.randint(0, v, lead, generator=gen),
        "kwargs": {},
    }
    kw = case["kwargs"]
    if features.get("bias"):
        kw["bias"] = rand(v).to(dtype).requires_grad_()
    if features.get("temperature") == "rows":
        kw["temperature"] = torch.rand(*lead[:-1], 1, generator=gen) + 0.5 if len(lead) > 1 \
            else torch.rand(lead, generator=gen) + 0.5
    elif "temperature" in features:
        kw["temperature"] = features["temperature"]
    for name in ("softcap", "shift"):
        if name in features:
            kw[name] = features[name]
    if "ignore" in features:
        drop = torch.rand(lead, generator=gen) < features["ignore"]
        case["targets"] = torch.where(drop, -100, case["targets"])
    if features.get("weights"):
        case["weights"] = torch.rand(lead, generator=gen) * 2
    case["ce_kwargs"] = {k: features[k] for k in ("label_smoothing", "z_loss") if k in features}
    case["upstream"] = (torch.randn(lead, generator=gen), torch.randn(lead, generator=gen))
    return case


def params(case):
    return [case["hidden"], case["weight"]] + ([case["kwargs"]["bias"]] if "bias" in case["kwargs"] else [])


def grads(output, case):
    return torch.autograd.grad(output, params(case), allow_unused=True)


def assert_close(actual, expected, *, rtol, atol_rel, what):
    assert actual.shape == expected.shape, what
    if expected.numel() == 0:
        return
    actual, expected = actual.double(), expected.double()
    atol = atol_rel * max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs() - rtol * expected.abs()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err.max().item() <= atol, f"{what}: max excess error {err.max().item():.3g} > atol {atol:.3g}"


def assert_grads_close(actual, expected, dtype, what):
    for name, a, e in zip(("hidden", "weight", "bias"), actual, expected):
        assert a.dtype == dtype, f"{what}: d{name} dtype {a.dtype}"
        if dtype == torch.bfloat16:
            assert_close(a, e, rtol=2 ** -8, atol_rel=1e-4, what=f"{what} d{name}")
        else:
            assert_close(a, e, rtol=1e-4, atol_rel=1e-5, what=f"{what} d{name}")


def backend_kwargs(backend, v):
    if backend == "torch-small-chunks":
        return {"backend": "torch", "memory_budget": small_budget(v)}
    return {"backend": backend}


def out_shape(case):
    shape = case["targets"].shape
    return shape[:-1] + (shape[-1] - 1,) if case["kwargs"].get("shift") else shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,v", SHAPES)
def test_logprobs_and_entropy(lead, d, v, dtype, feature, backend):
    case = make_case(lead, d, v, dtype, FEATURES[feature])
    ref = reference(*[t.detach() for t in (case["hidden"], case["weight"])], case["targets"],
                    bias=None if "bias" not in case["kwargs"] else case["kwargs"]["bias"].detach(),
                    **{k: x for k, x in case["kwargs"].items() if k != "bias"})
    out = linear_logprobs(case["hidden"], case["weight"], case["targets"], return_entropy=True,
                          **case["kwargs"], **backend_kwargs(backend, v))
    assert out.logprobs.dtype == out.entropy.dtype == torch.float32
    assert out.logprobs.shape == out_shape(case)
    assert_close(out.logprobs, ref["logprobs"], rtol=1e-5, atol_rel=1e-5, what="logprobs")
    assert_close(out.entropy, ref["entropy"], rtol=1e-5, atol_rel=1e-5, what="entropy")

    up_lp, up_ent = (u[..., :-1] if case["kwargs"].get("shift") else u for u in case["upstream"])
    ours = grads((out.logprobs * up_lp).sum() + (out.entropy * up_ent).sum(), case)
    ref_params = [p.detach().double().requires_grad_() for p in params(case)]
    ref = reference(ref_params[0], ref_params[1], case["targets"],
                    bias=ref_params[2] if len(ref_params) > 2 else None,
                    **{k: x for k, x in case["kwargs"].items() if k != "bias"})
    expected = torch.autograd.grad((ref["logprobs"] * up_lp).sum() + (ref["entropy"] * up_ent).sum(), ref_params)
    assert_grads_close(ours, expected, dtype, "logprobs+entropy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,v", SHAPES)
def test_cross_entropy(lead, d, v, dtype, feature, reduction, backend):
    case = make_case(lead, d, v, dtype, FEATURES[feature])
    loss = linear_cross_entropy(case["hidden"], case["weight"], case["targets"], weights=case.get("weights"),
                                reduction=reduction, **case["kwargs"], **case["ce_kwargs"],
                                **backend_kwargs(backend, v))
    ref_params = [p.detach().double().requires_grad_() for p in params(case)]
    ref = reference(ref_params[0], ref_params[1], case["targets"], weights=case.get("weights"),
                    bias=ref_params[2] if len(ref_params) > 2 else None, **case["ce_kwargs"],
                    **{k: x for k, x in case["kwargs"].items() if k != "bias"})[reduction]
    assert loss.dtype == torch.float32
    assert loss.shape == (out_shape(case) if reduction == "none" else ())
    assert_close(loss, ref, rtol=1e-5, atol_rel=1e-5, what=f"loss ({reduction})")

    upstream = case["upstream"][0]
    if case["kwargs"].get("shift"):
        upstream = upstream[..., :-1]
    weight_of = (lambda x: (x * upstream).sum()) if reduction == "none" else (lambda x: x * 0.75)
    ours = grads(weight_of(loss), case)
    expected = torch.autograd.grad(weight_of(ref), ref_params)
    assert_grads_close(ours, expected, dtype, f"cross-entropy ({reduction})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_without_grad_matches(backend):
    """The forward-only path (no gradient wanted) gives the same losses as the training path."""
    case = make_case((4, 33), 24, 3001, torch.float32, FEATURES["everything"])
    args = (case["hidden"], case["weight"], case["targets"])
    kwargs = dict(weights=case["weights"], **case["kwargs"], **case["ce_kwargs"], **backend_kwargs(backend, 3001))
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
