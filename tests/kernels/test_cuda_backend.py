"""The cuda backend (cuBLAS GEMMs and the CUDA C++ epilogue of ``csrc/cuda``) against the float64
reference, the torch epilogue and the triton backend: statistics and gradients, bitwise
reproducibility, batch invariance, the in-place half-precision gradient, and the ops' input checks.

Most tests need a GPU and the built extension (``make cuda-build`` builds it on a machine without
one); the checks of the ops' arguments run wherever the extension loads, and the message of a
missing extension wherever torch is a CPU build.
"""
import math
from types import SimpleNamespace

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
    params,
    upstream_grads,
)

from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.backends import cuda_chunked
from osft_kernels.backends.torch_chunked import TorchEpilogue
from osft_kernels.driver import NUM_PARTIALS, VOCAB_BLOCK, Chunk, ceil_div, row_align
from osft_kernels.row_stats import ENTROPY, LSE, NUM_STATS

LOADED = cuda_chunked.available()
loaded = pytest.mark.skipif(not LOADED, reason=f"the CUDA extension is not available: {cuda_chunked.extension()}")
gpu = pytest.mark.skipif(not (LOADED and torch.cuda.is_available()),
                         reason="needs a CUDA GPU and the CUDA extension")
DEVICE = "cuda"
# (leading dims, D, V): V < VOCAB_BLOCK, N = 1, three blocks (the last partial), an odd V (rows not
# 16-byte aligned: the scalar path), and a larger one
SHAPES = [((37,), 45, 300), ((1,), 9, 50), ((2, 19), 70, 2 * VOCAB_BLOCK + 907), ((3, 301), 200, 5003),
          ((1000,), 1030, 40000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [(shape, feature) for shape in SHAPES for feature in FEATURES]


def tolerance(dtype):
    return HALF_OPERAND_GRAD_TOLERANCE if dtype != torch.float32 else BF16_GRAD_TOLERANCE


def cuda_case(lead, d, v, dtype, feature, seed=0):
    return make_case(lead, d, v, dtype, FEATURES[feature], seed=seed, device=DEVICE)


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch is a CUDA build")
def test_a_cpu_build_of_torch_explains_why_the_backend_is_missing():
    assert "not a CUDA build" in cuda_chunked.extension()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda_chunked.check_inputs(torch.zeros(2, 3))


@loaded
def test_ops_refuse_tensors_off_the_gpu():
    z = torch.zeros(4, 10)
    with pytest.raises(RuntimeError, match="logits must be a CUDA tensor"):
        torch.ops.osft_kernels_cuda.block_stats(z, torch.zeros(4, 1, NUM_PARTIALS), torch.zeros(4),
                                                torch.zeros(4, dtype=torch.long), torch.ones(4), None, 0.0, 0, False,
                                                False, False)
    with pytest.raises(RuntimeError, match="logits must be a CUDA tensor"):
        torch.ops.osft_kernels_cuda.logit_grad(z, z, torch.zeros(4, dtype=torch.long), torch.ones(4),
                                               torch.zeros(4, NUM_STATS), torch.zeros(4, NUM_STATS), None, 0.0, 0, 10,
                                               False, False)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,feature", CASES)
def test_logprobs_and_entropy(shape, feature, dtype):
    check_logprobs_and_entropy(cuda_case(*shape, dtype, feature), tolerance(dtype), backend="cuda")


@gpu
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,feature", CASES[::2])
def test_cross_entropy(shape, feature, dtype, reduction):
    check_cross_entropy(cuda_case(*shape, dtype, feature), reduction, tolerance(dtype), backend="cuda")


@gpu
@pytest.mark.parametrize("feature", ["plain", "everything"])
def test_small_chunks_and_recomputing_fallback(feature):
    """Chunks of one row alignment by one block: cross-entropy falls back from full-vocabulary rows to
    a statistics pass and the recomputing backward."""
    budget = 4 * row_align(torch.device(DEVICE)) * VOCAB_BLOCK
    for dtype in (torch.float32, torch.bfloat16):
        case = cuda_case(*SHAPES[2], dtype, feature)
        check_cross_entropy(case, "mean", tolerance(dtype), backend="cuda", memory_budget=budget)


def _training_outputs(case, backend):
    """Logprobs, entropy and their gradients, then cross-entropy and its gradients."""
    out = linear_logprobs(case["hidden"], case["weight"], case["targets"], return_entropy=True, **case["kwargs"],
                          backend=backend)
    up_lp, up_ent = upstream_grads(case)
    ce = linear_cross_entropy(case["hidden"], case["weight"], case["targets"], token_weights=case.get("token_weights"),
                              backend=backend, **case["kwargs"], **case["ce_kwargs"])
    return (out.logprobs, out.entropy, *grads((out.logprobs * up_lp).sum() + (out.entropy * up_ent).sum(), case),
            ce, *grads(ce, case))


@gpu
@pytest.mark.parametrize("feature", ["plain", "everything"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_are_bitwise_reproducible(dtype, feature):
    case = cuda_case(*SHAPES[2], dtype, feature)
    for first, second in zip(_training_outputs(case, "cuda"), _training_outputs(case, "cuda")):
        assert torch.equal(first, second)


@gpu
@pytest.mark.parametrize("feature", ["plain", "everything"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_the_triton_backend(dtype, feature):
    """Same GEMMs, the same partials in another order of operations: outputs within float32
    rounding, gradients within the rounding of the logit gradient to the input dtype."""
    pytest.importorskip("triton")
    case = cuda_case(*SHAPES[3], dtype, feature)
    ours, theirs = _training_outputs(case, "cuda"), _training_outputs(case, "triton")
    n = len(params(case))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if i in (0, 1, 2 + n):  # logprobs, entropy, cross-entropy
            assert_close(a, b, rtol=1e-5, atol_rel=1e-5, what=f"output {i}")
        else:
            assert_close(a, b, **tolerance(dtype), what=f"gradient {i}")


@gpu
def test_forward_is_batch_invariant():
    """A row's logprob and entropy are bitwise the same alone, in a larger batch, or at another position."""
    _, d, v = SHAPES[2]
    case = cuda_case((37,), d, v, torch.bfloat16, "softcap")
    case["weight"] = case["weight"].detach()
    check_batch_invariance(case, backend="cuda")


def _chunk_inputs(r, w, v0, vocab, pad, seed):
    """A raw logits chunk ``[r, w]`` (row stride ``w + pad``), bias ``[vocab]`` with masked (-inf) columns,
    targets inside, before and after the chunk, and per-row ``1 / temperature``, on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.empty(r, w + pad, device=DEVICE)[:, :w]
    raw.copy_(torch.randn(r, w, generator=gen) * 3)
    bias = torch.randn(vocab, generator=gen)
    bias[v0 + 5:v0 + 40] = -math.inf
    targets = torch.tensor([v0, v0 + w - 1, v0 - 1, v0 + w, v0 + 2049])[:r]
    inv_temp = torch.rand(r, generator=gen) + 0.5
    return raw, bias.to(DEVICE), targets.to(DEVICE), inv_temp.to(DEVICE)


@gpu
@pytest.mark.parametrize("pad", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_block_stats_match_the_torch_epilogue(softcap, pad):
    r, w, v0 = 5, 2 * VOCAB_BLOCK + 77, VOCAB_BLOCK
    raw, bias, targets, inv_temp = _chunk_inputs(r, w, v0, v0 + w + 10, pad, seed=3)
    blocks = ceil_div(w, VOCAB_BLOCK)
    partials = torch.full((r, blocks + 2, NUM_PARTIALS), 7.0, device=DEVICE)  # the driver passes a slice
    target_logit = torch.full((r,), 7.0, device=DEVICE)
    torch.ops.osft_kernels_cuda.block_stats(raw, partials[:, 1:-1], target_logit, targets, inv_temp, bias,
                                            softcap or 0.0, v0, True, True, True)

    layer = SimpleNamespace(bias=bias, softcap=softcap, vocab_size=bias.shape[0])
    chunk = Chunk(torch.empty(r, 1, device=DEVICE), targets, 1.0 / inv_temp)
    epilogue = TorchEpilogue()
    z = epilogue.logits(raw.clone(), layer, chunk, v0)
    expected = torch.zeros(r, blocks, NUM_PARTIALS, device=DEVICE)
    expected_target = torch.full((r,), 7.0, device=DEVICE)
    epilogue.block_stats(z, layer, chunk, v0, expected, expected_target, entropy=True, mean=True, square=True)
    assert (partials[:, 0] == 7).all() and (partials[:, -1] == 7).all()
    # a block with a masked column has a logit sum of -inf (without softcap), in both
    torch.testing.assert_close(partials[:, 1:-1], expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(target_logit, expected_target, rtol=1e-6, atol=1e-6)


@gpu
@pytest.mark.parametrize("pad", [3, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_gradient_is_written_over_its_own_logits(dtype, pad):
    """Row i's half-precision gradient is written over the first half of row i's float32 logits: every
    value must be computed from logits read before they were overwritten, so it equals the gradient
    written to a separate buffer, bit for bit, and the float64 formula within one rounding."""
    r, w, v0, vocab, softcap = 5, 3 * 1024 + 77, 2048, 9000, 4.0
    raw, bias, targets, inv_temp = _chunk_inputs(r, w, v0, vocab, pad, seed=4)
    s = (raw.double() + bias[v0:v0 + w].double())
    z = softcap * torch.tanh(s / softcap) * inv_temp.double()[:, None]
    lse = torch.logsumexp(z, 1)
    log_p = z - lse[:, None]
    entropy = -(log_p.exp() * log_p.clamp(min=-1e4)).sum(1)
    stats = torch.zeros(r, NUM_STATS, dtype=torch.float64, device=DEVICE)
    stats[:, LSE], stats[:, ENTROPY] = lse, entropy
    coef = torch.zeros(r, NUM_STATS, dtype=torch.float64, device=DEVICE)
    coef[:, :4] = torch.randn(r, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)
    expected = log_p.exp() * (coef[:, :1] - coef[:, 3:4] * (log_p.clamp(min=-1e4) + entropy[:, None]))
    expected += coef[:, 2:3] / vocab
    local = targets - v0
    hit = (local >= 0) & (local < w)
    expected[hit, local[hit]] += coef[hit, 1]
    expected *= 1 - torch.tanh(s / softcap) ** 2

    args = (targets, inv_temp, stats.float(), coef.float(), bias, softcap, v0, vocab, True, True)
    separate = torch.empty(r, w, dtype=dtype, device=DEVICE)
    torch.ops.osft_kernels_cuda.logit_grad(raw, separate, *args)
    dz = raw.view(dtype)[:, :w]
    torch.ops.osft_kernels_cuda.logit_grad(raw, dz, *args)
    assert dz.data_ptr() == raw.data_ptr()
    assert torch.equal(dz, separate)
    assert_close(dz, expected, rtol=torch.finfo(dtype).eps, atol_rel=1e-6, what=f"{dtype} dz")
