"""The triton backend against the float64 reference, and its modes: deterministic gradients, batch
invariance, gradient filtering, 64-bit offsets, grid sizes and memory.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors (``conftest.py``),
with one small-tile config (16 x 64 x 32, 128-column forward chunks), so the shapes below cross
several row, column, hidden-size and chunk boundaries without being multiples of any of them. With
CUDA the same tests run natively on the GPU, plus larger shapes. Native bfloat16 backward feeds the
logit gradient to the tensor cores in bfloat16, so bfloat16 gradient tolerances are wider there
(derived, not yet measured on a GPU); the interpreter computes in float32 and meets the strict ones.
"""
import os
import subprocess
import sys

import pytest
import torch
from cases import (
    BF16_GRAD_TOLERANCE,
    FEATURES,
    check_cross_entropy,
    check_logprobs_and_entropy,
    grads,
    make_case,
)

from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.memory import PeakMemory

pytest.importorskip("triton")
from osft_kernels.backends import resolve_backend, triton_fused
from osft_kernels.triton_kernels import configs
from osft_kernels.triton_kernels.backward import FUSED, OWN_COLS, OWN_ROWS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NATIVE = DEVICE == "cuda"
# (leading dims, D, V): N = 1 with V < BLOCK_V and D < BLOCK_D; several tiles of every kind
SHAPES = [((37,), 45, 300), ((1,), 9, 50), ((2, 19), 70, 130)]
if NATIVE:
    SHAPES += [((3, 301), 200, 5003), ((1000,), 1030, 40000)]
DTYPES = [torch.float32, torch.bfloat16]
BF16_TOLERANCE = {"rtol": 2 ** -6, "atol_rel": 2e-3} if NATIVE else BF16_GRAD_TOLERANCE


def triton_case(lead, d, v, dtype, feature, seed=0):
    return make_case(lead, d, v, dtype, FEATURES[feature], seed=seed, device=DEVICE)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,v", SHAPES)
def test_logprobs_and_entropy(lead, d, v, dtype, feature):
    check_logprobs_and_entropy(triton_case(lead, d, v, dtype, feature), BF16_TOLERANCE, backend="triton")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,v", SHAPES[::2])
def test_cross_entropy(lead, d, v, dtype, feature, reduction):
    check_cross_entropy(triton_case(lead, d, v, dtype, feature), reduction, BF16_TOLERANCE, backend="triton")


@pytest.mark.parametrize("feature", ["plain", "everything"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_gradients_are_exact_and_reproducible(dtype, feature):
    lead, d, v = SHAPES[0]
    case = triton_case(lead, d, v, dtype, feature)
    check_logprobs_and_entropy(case, BF16_TOLERANCE, backend="triton", deterministic=True)
    check_cross_entropy(case, "mean", BF16_TOLERANCE, backend="triton", deterministic=True)

    def run():
        out = linear_logprobs(case["hidden"], case["weight"], case["targets"], return_entropy=True,
                              backend="triton", deterministic=True, **case["kwargs"])
        up_lp, up_ent = (u[..., :-1] if case["kwargs"].get("shift") else u for u in case["upstream"])
        return (out.logprobs, out.entropy, *grads((out.logprobs * up_lp).sum() + (out.entropy * up_ent).sum(), case))

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [False, True])
def test_forward_is_batch_invariant(deterministic):
    """A row's logprob and entropy are bitwise the same alone, in a larger batch, or at another position."""
    lead, d, v = SHAPES[0]
    case = triton_case(lead, d, v, torch.bfloat16, "softcap")
    hidden, weight, targets = (case[k].detach() for k in ("hidden", "weight", "targets"))
    temperature = case["kwargs"]["temperature"]
    kwargs = dict(bias=case["kwargs"]["bias"].detach(), softcap=case["kwargs"]["softcap"], return_entropy=True,
                  backend="triton", deterministic=deterministic)
    full = linear_logprobs(hidden, weight, targets, temperature=temperature, **kwargs)
    order = torch.randperm(lead[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    extra = torch.randn(5, d, device=DEVICE).to(hidden.dtype)
    bigger_hidden = torch.cat([extra, hidden[order]])
    bigger_targets = torch.cat([targets[:5], targets[order]])
    bigger_temperature = torch.cat([temperature[:5], temperature[order]])
    permuted = linear_logprobs(bigger_hidden, weight, bigger_targets, temperature=bigger_temperature, **kwargs)
    for name in ("logprobs", "entropy"):
        assert torch.equal(getattr(permuted, name)[5:], getattr(full, name)[order]), name
    single = linear_logprobs(hidden[7:8], weight, targets[7:8], temperature=temperature[7:8], **kwargs)
    assert torch.equal(single.logprobs, full.logprobs[7:8]) and torch.equal(single.entropy, full.entropy[7:8])


def _peaked_case(dtype):
    """Logits whose first 64 vocabulary columns hold nearly all the probability mass: the other tiles'
    softmax entries are ~e^-30, far below any default threshold."""
    gen = torch.Generator().manual_seed(3)
    n, d, v = 37, 45, 300
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) / d ** 0.5
    bias = torch.cat([torch.zeros(64), torch.full((v - 64,), -30.0)])
    targets = torch.randint(0, 64, (n,), generator=gen)
    leaf = lambda x: x.to(device=DEVICE, dtype=dtype).requires_grad_()
    return leaf(hidden), leaf(weight), leaf(bias), targets.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_filtering_default_is_below_output_resolution(dtype):
    hidden, weight, bias, targets = _peaked_case(dtype)

    def gradients(filter_eps):
        loss = linear_cross_entropy(hidden, weight, targets, bias=bias, backend="triton", filter_eps=filter_eps)
        return torch.autograd.grad(loss, (hidden, weight, bias))

    exact, default = gradients(0.0), gradients("auto")
    resolution = torch.finfo(dtype).eps
    for e, a in zip(exact, default):
        scale = e.abs().max().item()
        assert (a.double() - e.double()).abs().max().item() <= resolution * scale
    # the default did skip the low-probability tiles: their weight rows got exactly zero gradient,
    # where the exact backward gives them tiny nonzero values
    assert exact[1][64:].abs().sum() > 0 and not default[1][64:].any()
    # and a threshold too large to be safe visibly changes the gradients: the test can fail
    coarse = gradients(10.0)
    assert (coarse[0].double() - exact[0].double()).abs().max() > 100 * resolution * exact[0].abs().max()


def test_gradient_filtering_keeps_diffuse_mass():
    """With label smoothing every column carries gradient; a tile's share is far above the default
    threshold although each entry is tiny, so nothing is skipped."""
    hidden, weight, bias, targets = _peaked_case(torch.float32)
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, label_smoothing=0.1, backend="triton")
    (d_weight,) = torch.autograd.grad(loss, (weight,))
    assert d_weight[64:].abs().amin(1).gt(0).all()


_INT64_SCRIPT = r"""
import os, torch
from osft_kernels import linear_logprobs
torch.manual_seed(0)
d, rows = 24, 2049
# a [rows, d] bfloat16 view with a row stride of 2**20 elements: the last row starts at element
# 2**31, so 32-bit offsets wrap. Only the touched pages of the 4 GiB storage are ever allocated.
def strided(values):
    view = torch.empty(2**31 + d, dtype=torch.bfloat16).as_strided((rows, d), (2**20, 1))
    return view.copy_(values).requires_grad_()
small = torch.randn(3, d).bfloat16()
values = torch.randn(rows, d).bfloat16()
for big_is in ("weight", "hidden"):
    big = strided(values)
    hidden, weight = (small, big) if big_is == "weight" else (big, small * 0.3)
    targets = torch.randint(0, weight.shape[0], (hidden.shape[0],))
    out = linear_logprobs(hidden, weight, targets, backend="triton").logprobs
    grad = torch.autograd.grad(out.sum(), big)[0]
    dense = big.detach().contiguous().requires_grad_()
    ref_args = (dense, weight) if big_is == "hidden" else (hidden, dense)
    ref = linear_logprobs(*ref_args, targets, backend="torch").logprobs
    ref_grad = torch.autograd.grad(ref.sum(), dense)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2**-7, atol=1e-3)
print("ok")
"""


@pytest.mark.skipif(NATIVE, reason="the interpreter case; on a GPU the 2**31-element views would be real memory")
def test_offsets_past_two_to_the_31_elements():
    """Rows of hidden and weight that start beyond element 2**31 are read and written correctly.

    Runs in a subprocess: a 32-bit offset there wraps and reads a wild address (a segfault)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _INT64_SCRIPT], env=env, check=False, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize("arch", [90, 80])
def test_grids_are_one_dimensional_and_fit(arch):
    """Every launch uses grid axis 0 only (limit 2**31 - 1), at a million tokens and V = 262,144."""
    n, v = 2**20, 262_144
    for config in configs.FORWARD_CONFIGS[arch]:
        (size,) = triton_fused.forward_grid(n, v, config.kwargs)
        assert size < 2**31 - 1
    for config in configs.BACKWARD_CONFIGS[arch]:
        for mode in (FUSED, OWN_ROWS, OWN_COLS):
            (size,) = triton_fused.backward_grid(mode, n, v, config.kwargs)
            assert size < 2**31 - 1


def test_no_full_vocabulary_tensor_is_allocated():
    n, d, v = 64, 16, 1500
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(v, d, generator=gen).to(DEVICE).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    with PeakMemory() as peak:
        out = linear_logprobs(hidden, weight, targets, return_entropy=True, backend="triton")
        (out.logprobs.sum() + out.entropy.sum()).backward()
    # float32 gradient accumulators, the returned gradients, O(n) statistics; no n x V buffer
    logits_bytes = n * v * 4
    assert peak.peak_bytes < logits_bytes / 2, (peak.peak_bytes, logits_bytes)


def test_auto_uses_triton_for_cuda_tensors_and_torch_otherwise():
    assert resolve_backend("auto", torch.device("cuda")) is triton_fused
    assert resolve_backend("auto", torch.device("cpu")).__name__.endswith("torch_chunked")


def test_float64_is_refused_with_a_clear_error():
    hidden = torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    weight = torch.randn(10, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="backend='triton' supports float32, bfloat16 and float16"):
        linear_logprobs(hidden, weight, torch.zeros(4, dtype=torch.long, device=DEVICE), backend="triton")


def test_weight_changed_before_backward_is_an_error():
    """An in-place update between forward and backward (e.g. an optimizer step) is caught, not
    silently differentiated at the new weights."""
    case = triton_case((5,), 8, 20, torch.float32, "plain")
    out = linear_logprobs(case["hidden"], case["weight"], case["targets"], backend="triton")
    with torch.no_grad():
        case["weight"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.logprobs.sum().backward()
