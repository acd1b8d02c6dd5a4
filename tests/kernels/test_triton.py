"""The triton backend against the float64 reference: the chunked driver with Triton epilogues (training)
and the fused forward (statistics without gradients); determinism, batch invariance, the in-place
half-precision gradient, 64-bit offsets, grids and memory.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors (``conftest.py``):
the driver's GEMMs are then CPU BLAS products in float32 and the fused forward uses one small-tile
config (16 x 64 x 32, 128-column chunks), so the shapes below cross several row, block, hidden-size
and chunk boundaries without being multiples of any of them. With CUDA the same tests run natively
(cuBLAS with bfloat16 operands and a bfloat16 logit gradient, so bfloat16 gradient tolerances are
wider there), plus larger shapes and float16.
"""
import os
import subprocess
import sys

import pytest
import torch
from helpers.cases import (
    BF16_GRAD_TOLERANCE,
    FEATURES,
    HALF_OPERAND_GRAD_TOLERANCE,
    assert_close,
    check_batch_invariance,
    check_cross_entropy,
    check_logprobs_and_entropy,
    grads,
    make_case,
    out_shape,
    reference_outputs,
)

from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.driver import VOCAB_BLOCK, row_align
from osft_kernels.memory import PeakMemory
from osft_kernels.row_stats import ENTROPY, LSE, NUM_STATS

pytest.importorskip("triton")
from osft_kernels.backends import resolve_backend, triton_chunked
from osft_kernels.triton_kernels import configs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NATIVE = DEVICE == "cuda"
# (leading dims, D, V): N = 1 with V < VOCAB_BLOCK; every feature on these
SHAPES = [((37,), 45, 300), ((1,), 9, 50)]
# three vocabulary blocks, the last one partial: the block merge, with the features that change it
MULTI_BLOCK = ((2, 19), 70, 2 * VOCAB_BLOCK + 907)
MULTI_BLOCK_FEATURES = ["plain", "softcap", "smoothing", "everything"]
DTYPES = [torch.float32, torch.bfloat16]
if NATIVE:
    SHAPES += [MULTI_BLOCK, ((3, 301), 200, 5003), ((1000,), 1030, 40000)]
    DTYPES += [torch.float16]
CASES = [(shape, feature) for shape in SHAPES for feature in FEATURES] + (
    [] if NATIVE else [(MULTI_BLOCK, feature) for feature in MULTI_BLOCK_FEATURES])
HALF_TOLERANCE = HALF_OPERAND_GRAD_TOLERANCE if NATIVE else BF16_GRAD_TOLERANCE
# the smallest budget of a three-block vocabulary: chunks of one row alignment (16 rows, 256 on CUDA)
# by 2048 columns, and cross-entropy falls back from full-vocabulary rows to a statistics pass plus
# the recomputing backward
SMALL_BUDGET = 4 * row_align(torch.device(DEVICE)) * VOCAB_BLOCK


def triton_case(lead, d, v, dtype, feature, seed=0):
    return make_case(lead, d, v, dtype, FEATURES[feature], seed=seed, device=DEVICE)


def tolerance(dtype):
    return HALF_TOLERANCE if dtype != torch.float32 else BF16_GRAD_TOLERANCE


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,feature", CASES)
def test_logprobs_and_entropy(shape, feature, dtype):
    check_logprobs_and_entropy(triton_case(*shape, dtype, feature), tolerance(dtype), backend="triton")


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,feature", CASES[::2])
def test_cross_entropy(shape, feature, dtype, reduction):
    check_cross_entropy(triton_case(*shape, dtype, feature), reduction, tolerance(dtype), backend="triton")


@pytest.mark.parametrize("feature", ["plain", "everything"])
def test_summed_cross_entropy(feature):
    """``reduction="sum"`` (the same path as "mean", scaled differently)."""
    check_cross_entropy(triton_case(*SHAPES[0], torch.float32, feature), "sum", backend="triton")


@pytest.mark.parametrize("feature", ["plain", "everything"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_chunks_and_recomputing_fallback(dtype, feature):
    """Several row and vocabulary chunks per call; cross-entropy cannot hold full rows and recomputes."""
    case = triton_case(*MULTI_BLOCK, dtype, feature)
    check_logprobs_and_entropy(case, tolerance(dtype), backend="triton", memory_budget=SMALL_BUDGET)
    check_cross_entropy(case, "mean", tolerance(dtype), backend="triton", memory_budget=SMALL_BUDGET)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,feature", [(SHAPES[0], feature) for feature in FEATURES] + [(MULTI_BLOCK, "everything")])
def test_fused_forward_statistics(shape, feature, dtype):
    """``memory_budget=0`` without gradients: the fused forward kernels."""
    case = triton_case(*shape, dtype, feature)
    ref, _ = reference_outputs(case)
    with torch.no_grad():
        out = linear_logprobs(case["hidden"], case["weight"], case["targets"], return_entropy=True, backend="triton",
                              memory_budget=0, **case["kwargs"])
        loss = linear_cross_entropy(case["hidden"], case["weight"], case["targets"],
                                    token_weights=case.get("token_weights"),
                                    reduction="none", backend="triton", memory_budget=0, **case["kwargs"],
                                    **case["ce_kwargs"])
    assert out.logprobs.shape == loss.shape == out_shape(case)
    # bfloat16 products accumulate in a different order than float64: a few float32 ulps of the logits
    for name, value, expected in (("logprobs", out.logprobs, ref["logprobs"]), ("entropy", out.entropy,
                                                                                 ref["entropy"]),
                                  ("loss", loss, ref["none"])):
        assert_close(value, expected, rtol=1e-5, atol_rel=1e-5 if dtype == torch.float32 or not NATIVE else 1e-4,
                     what=name)


def _training_run(case, **kwargs):
    out = linear_logprobs(case["hidden"], case["weight"], case["targets"], return_entropy=True, backend="triton",
                          **case["kwargs"], **kwargs)
    up_lp, up_ent = (u[..., :-1] if case["kwargs"].get("shift") else u for u in case["upstream"])
    ce = linear_cross_entropy(case["hidden"], case["weight"], case["targets"],
                              token_weights=case.get("token_weights"),
                              backend="triton", **case["kwargs"], **case["ce_kwargs"], **kwargs)
    return (out.logprobs, out.entropy, *grads((out.logprobs * up_lp).sum() + (out.entropy * up_ent).sum(), case),
            ce, *grads(ce, case))


@pytest.mark.parametrize("feature", ["plain", "everything"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_are_bitwise_reproducible(dtype, feature):
    case = triton_case(*(MULTI_BLOCK if NATIVE else SHAPES[0]), dtype, feature)
    for first, second in zip(_training_run(case), _training_run(case)):
        assert torch.equal(first, second)


def test_a_gradient_needs_a_logits_buffer():
    case = triton_case((5,), 8, 20, torch.float32, "plain")
    with pytest.raises(ValueError, match="or 0 with backend='triton' and no gradients"):
        linear_logprobs(case["hidden"], case["weight"], case["targets"], backend="triton", memory_budget=0)


@pytest.mark.slow
@pytest.mark.parametrize("grad,budget", [(False, 0), (False, None), (True, None)],
                         ids=["fused-forward", "chunked-driver", "chunked-driver-with-grad"])
def test_forward_is_batch_invariant(grad, budget):
    """A row's logprob and entropy are bitwise the same alone, in a larger batch, or at another position."""
    _, d, v = MULTI_BLOCK
    case = triton_case((37,), d, v, torch.bfloat16, "softcap")
    case["weight"] = case["weight"].detach().requires_grad_(grad)
    check_batch_invariance(case, backend="triton", memory_budget=budget)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_gradient_is_written_over_its_own_logits(dtype):
    """The gradient kernel writes row i's half-precision gradient over the first half of row i's float32
    logits; every value must be computed from logits read before they were overwritten."""
    gen = torch.Generator().manual_seed(4)
    r, w, v0, vocab = 5, 3 * 1024 + 77, 40, 9000
    raw = (torch.randn(r, w, generator=gen, dtype=torch.float64) * 3).to(DEVICE)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64).to(DEVICE)
    targets = torch.tensor([41, 39, 40 + w - 1, 3000, 8999]).to(DEVICE)
    inv_temp = (torch.rand(r, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)
    softcap = 4.0
    z = softcap * torch.tanh((raw + bias[v0:v0 + w]) / softcap) * inv_temp[:, None]
    lse = torch.logsumexp(z, 1)
    log_p = z - lse[:, None]
    entropy = -(log_p.exp() * log_p).sum(1)
    stats = torch.zeros(r, NUM_STATS, dtype=torch.float64, device=DEVICE)
    stats[:, LSE], stats[:, ENTROPY] = lse, entropy
    coef = torch.zeros(r, NUM_STATS, dtype=torch.float64, device=DEVICE)
    coef[:, :4] = torch.randn(r, 4, generator=gen, dtype=torch.float64).to(DEVICE)  # the differentiable columns
    expected = log_p.exp() * (coef[:, :1] - coef[:, 3:4] * (log_p + entropy[:, None])) + coef[:, 2:3] / vocab
    local = targets - v0
    hit = (local >= 0) & (local < w)
    expected[hit, local[hit]] += coef[hit, 1]
    expected *= 1 - (torch.tanh((raw + bias[v0:v0 + w]) / softcap)) ** 2

    buffer = torch.empty(r, w + 3, device=DEVICE)[:, :w]  # a row stride larger than the row, as in a chunk view
    buffer.copy_(raw)
    dz = buffer.view(dtype)[:, :w] if buffer.stride(0) % 2 == 0 else None
    assert dz is not None and dz.data_ptr() == buffer.data_ptr()
    triton_chunked.launch_logit_grad(buffer, dz, targets, inv_temp.float(), stats.float(), coef.float(), bias.float(),
                                     softcap, v0, vocab, entropy=True, mean=True)
    # one rounding to the half dtype (the interpreter truncates: a full ulp)
    assert_close(dz, expected, rtol=2 * torch.finfo(dtype).eps, atol_rel=1e-6, what=f"{dtype} dz")


_INT64_SCRIPT = r"""
import os, torch
from osft_kernels import linear_logprobs
torch.manual_seed(0)
d, rows = 24, 2049
# a [rows, d] bfloat16 view with a row stride of 2**20 elements: the last row starts at element
# 2**31, so 32-bit offsets wrap. Only the touched pages of the 4 GiB storage are ever allocated.
def strided(values):
    view = torch.empty(2**31 + d, dtype=torch.bfloat16).as_strided((rows, d), (2**20, 1))
    return view.copy_(values)
small = torch.randn(3, d).bfloat16()
values = torch.randn(rows, d).bfloat16()
for big_is in ("weight", "hidden"):
    big = strided(values)
    hidden, weight = (small, big) if big_is == "weight" else (big, small * 0.3)
    targets = torch.randint(0, weight.shape[0], (hidden.shape[0],))
    with torch.no_grad():
        out = linear_logprobs(hidden, weight, targets, backend="triton", memory_budget=0).logprobs
    dense = big.contiguous()
    ref_args = (dense, weight) if big_is == "hidden" else (hidden, dense)
    ref = linear_logprobs(*ref_args, targets, backend="torch").logprobs
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(NATIVE, reason="the interpreter case; on a GPU the 2**31-element views would be real memory")
def test_fused_forward_reads_past_two_to_the_31_elements():
    """Rows of hidden and weight that start beyond element 2**31 are read correctly by the fused forward.

    Runs in a subprocess: a 32-bit offset there wraps and reads a wild address (a segfault)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _INT64_SCRIPT], env=env, check=False, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.slow
def test_no_full_vocabulary_tensor_is_allocated():
    align = row_align(torch.device(DEVICE))
    n, d, v = 16 * align, 16, 3000
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(v, d, generator=gen).to(DEVICE).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    budget = 4 * align * v  # one alignment's worth of rows per chunk
    with PeakMemory() as peak:
        out = linear_logprobs(hidden, weight, targets, return_entropy=True, backend="triton", memory_budget=budget)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        linear_cross_entropy(hidden, weight, targets, backend="triton", memory_budget=budget).backward()
    # float32 gradient accumulators, the returned gradients, one chunk, O(n) statistics; no n x V buffer
    logits_bytes = n * v * 4
    assert peak.peak_bytes < logits_bytes / 2, (peak.peak_bytes, logits_bytes)


def test_capabilities_map_to_their_configs():
    expected = {(8, 0): 80, (8, 6): 80, (8, 9): 89, (9, 0): 90, (10, 0): 100, (10, 3): 100, (12, 0): 120}
    assert {cap: configs.arch_of(cap) for cap in expected} == expected
    with pytest.raises(RuntimeError, match="compute capability 8.0 or newer, got 7.5"):
        configs.arch_of((7, 5))


def test_auto_uses_triton_for_cuda_tensors():
    assert resolve_backend("auto", torch.device("cuda")) is triton_chunked.BACKEND


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
