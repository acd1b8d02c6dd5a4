"""Test cases shared by the parity suites: inputs with every feature of the API, and checks of a
backend's outputs and gradients against the float64 reference.

Tolerances (elementwise ``|ours - ref| <= atol + rtol * |ref|``, with ``atol`` relative to the
largest reference magnitude): outputs are float32 for every input dtype and are compared at
``rtol = atol = 1e-5``; float32 gradients at ``rtol = 1e-4, atol = 1e-5 * max|ref|``; bfloat16
gradients are rounded once from float32 accumulators, so they must be within 2**-8 relative
(one bf16 ulp is 2**-7, round-to-nearest gives half of it) plus ``1e-4 * max|ref|``; with
half-precision GEMM operands the logit gradient is rounded too (``HALF_OPERAND_GRAD_TOLERANCE``).
"""
import torch

from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.backends import cpu, resolve_backend

from .reference64 import reference

BF16_GRAD_TOLERANCE = {"rtol": 2 ** -8, "atol_rel": 1e-4}
# half-precision GEMM operands (CUDA; the cpu backend's bfloat16 products): the logit gradient is
# rounded to the input dtype before the two gradient GEMMs, so the error of a gradient entry scales
# with sum_j |dz_j| |W_j| rather than with the (cancelling) sum itself: one bf16 ulp of the largest
# entry (2**-7) on top of the relative 2**-6
HALF_OPERAND_GRAD_TOLERANCE = {"rtol": 2 ** -6, "atol_rel": 2 ** -7}


def bf16_grad_tolerance(backend: str, d: int) -> dict:
    """The bfloat16 gradient tolerance of ``backend`` (``"auto"``, or a name like ``"cpu-small-chunks"``)
    on CPU tensors: the cpu backend runs bfloat16 products for even ``d`` where the CPU has them (AMX
    or AVX512-BF16)."""
    name = backend.split("-")[0]
    on_cpu_backend = name == "cpu" or (name == "auto" and resolve_backend("auto", torch.device("cpu")) is cpu.BACKEND)
    if on_cpu_backend and d % 2 == 0 and cpu.bfloat16_products():
        return HALF_OPERAND_GRAD_TOLERANCE
    return BF16_GRAD_TOLERANCE


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


def make_case(lead, d, v, dtype, features, seed=0, device="cpu"):
    """Inputs of one test case (drawn on the CPU from ``seed``, then moved to ``device``)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    leaf = lambda x: x.to(device=device, dtype=dtype).requires_grad_()
    case = {
        "hidden": leaf(rand(*lead, d)),
        "weight": leaf(rand(v, d) * 2 / d ** 0.5),
        "targets": torch.randint(0, v, lead, generator=gen),
        "kwargs": {},
    }
    kw = case["kwargs"]
    if features.get("bias"):
        kw["bias"] = leaf(rand(v))
    if features.get("temperature") == "rows":
        kw["temperature"] = (torch.rand(*lead[:-1], 1, generator=gen) + 0.5 if len(lead) > 1
                             else torch.rand(lead, generator=gen) + 0.5).to(device)
    elif "temperature" in features:
        kw["temperature"] = features["temperature"]
    for name in ("softcap", "shift"):
        if name in features:
            kw[name] = features[name]
    if "ignore" in features:
        drop = torch.rand(lead, generator=gen) < features["ignore"]
        case["targets"] = torch.where(drop, -100, case["targets"])
    case["targets"] = case["targets"].to(device)
    if features.get("weights"):  # per target: shaped like the outputs
        case["token_weights"] = (torch.rand(out_shape(case), generator=gen) * 2).to(device)
    case["ce_kwargs"] = {k: features[k] for k in ("label_smoothing", "z_loss") if k in features}
    case["upstream"] = (torch.randn(lead, generator=gen).to(device), torch.randn(lead, generator=gen).to(device))
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


def assert_grads_close(actual, expected, dtype, what, bf16_tolerance=BF16_GRAD_TOLERANCE):
    for name, a, e in zip(("hidden", "weight", "bias"), actual, expected):
        assert a.dtype == dtype, f"{what}: d{name} dtype {a.dtype}"
        if dtype in (torch.bfloat16, torch.float16):
            assert_close(a, e, **bf16_tolerance, what=f"{what} d{name}")
        else:
            assert_close(a, e, rtol=1e-4, atol_rel=1e-5, what=f"{what} d{name}")


def out_shape(case):
    shape = case["targets"].shape
    return shape[:-1] + (shape[-1] - 1,) if case["kwargs"].get("shift") else shape


def reference_outputs(case):
    """Float64 reference outputs for ``case``, differentiable in its float64 parameter copies."""
    ref_params = [p.detach().double().requires_grad_() for p in params(case)]
    ref = reference(ref_params[0], ref_params[1], case["targets"], token_weights=case.get("token_weights"),
                    bias=ref_params[2] if len(ref_params) > 2 else None, **case["ce_kwargs"],
                    **{k: x for k, x in case["kwargs"].items() if k != "bias"})
    return ref, ref_params


def upstream_grads(case):
    """Random upstream gradients for logprobs and entropy, shaped like the (shifted) outputs."""
    return tuple(u[..., :-1] if case["kwargs"].get("shift") else u for u in case["upstream"])


def check_batch_invariance(case, **api_kwargs):
    """A row's logprob and entropy from ``linear_logprobs`` of ``case`` (37 rows, with bias, softcap and a
    per-row temperature) are bitwise the same alone, in a larger batch, or at another position."""
    hidden, weight, targets = case["hidden"].detach(), case["weight"], case["targets"]
    temperature = case["kwargs"]["temperature"]
    kwargs = dict(bias=case["kwargs"]["bias"].detach(), softcap=case["kwargs"]["softcap"], return_entropy=True,
                  **api_kwargs)
    full = linear_logprobs(hidden, weight, targets, temperature=temperature, **kwargs)
    order = torch.randperm(37, generator=torch.Generator().manual_seed(1)).to(hidden.device)
    extra = torch.randn(5, hidden.shape[1], device=hidden.device).to(hidden.dtype)
    bigger = linear_logprobs(torch.cat([extra, hidden[order]]), weight, torch.cat([targets[:5], targets[order]]),
                             temperature=torch.cat([temperature[:5], temperature[order]]), **kwargs)
    for name in ("logprobs", "entropy"):
        assert torch.equal(getattr(bigger, name)[5:], getattr(full, name)[order]), name
    single = linear_logprobs(hidden[7:8], weight, targets[7:8], temperature=temperature[7:8], **kwargs)
    assert torch.equal(single.logprobs, full.logprobs[7:8]) and torch.equal(single.entropy, full.entropy[7:8])


def check_logprobs_and_entropy(case, bf16_tolerance=BF16_GRAD_TOLERANCE, **api_kwargs):
    """``linear_logprobs(..., return_entropy=True, **api_kwargs)`` and its gradients under random
    upstream gradients on both outputs match the reference."""
    out = linear_logprobs(case["hidden"], case["weight"], case["targets"], return_entropy=True,
                          **case["kwargs"], **api_kwargs)
    ref, ref_params = reference_outputs(case)
    assert out.logprobs.dtype == out.entropy.dtype == torch.float32
    assert out.logprobs.shape == out_shape(case)
    assert_close(out.logprobs, ref["logprobs"], rtol=1e-5, atol_rel=1e-5, what="logprobs")
    assert_close(out.entropy, ref["entropy"], rtol=1e-5, atol_rel=1e-5, what="entropy")

    up_lp, up_ent = upstream_grads(case)
    ours = grads((out.logprobs * up_lp).sum() + (out.entropy * up_ent).sum(), case)
    expected = torch.autograd.grad((ref["logprobs"] * up_lp).sum() + (ref["entropy"] * up_ent).sum(), ref_params)
    assert_grads_close(ours, expected, case["hidden"].dtype, "logprobs+entropy", bf16_tolerance)


def check_cross_entropy(case, reduction, bf16_tolerance=BF16_GRAD_TOLERANCE, **api_kwargs):
    """``linear_cross_entropy(..., reduction=reduction, **api_kwargs)`` and its gradients match the reference."""
    loss = linear_cross_entropy(case["hidden"], case["weight"], case["targets"],
                                token_weights=case.get("token_weights"),
                                reduction=reduction, **case["kwargs"], **case["ce_kwargs"], **api_kwargs)
    ref, ref_params = reference_outputs(case)
    ref = ref[reduction]
    assert loss.dtype == torch.float32
    assert loss.shape == (out_shape(case) if reduction == "none" else ())
    assert_close(loss, ref, rtol=1e-5, atol_rel=1e-5, what=f"loss ({reduction})")

    upstream = upstream_grads(case)[0]
    weight_of = (lambda x: (x * upstream).sum()) if reduction == "none" else (lambda x: x * 0.75)
    ours = grads(weight_of(loss), case)
    expected = torch.autograd.grad(weight_of(ref), ref_params)
    assert_grads_close(ours, expected, case["hidden"].dtype, f"cross-entropy ({reduction})", bf16_tolerance)
