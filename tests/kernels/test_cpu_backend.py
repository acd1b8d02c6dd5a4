"""The cpu backend (the C++ extension of ``csrc/cpu``): how it is found and chosen, its bfloat16 products
and their packed operands, chunks of many row tiles against float64, run-to-run, thread-count and
vector-width independence, and the checks of its ops. Parity over the whole feature matrix is in
``test_parity.py``, gradcheck in ``test_gradcheck.py``, batch invariance in ``test_invariance.py``."""
import os
import subprocess
import sys

import pytest
import torch
from helpers.cases import (
    FEATURES,
    bf16_grad_tolerance,
    check_cross_entropy,
    check_logprobs_and_entropy,
    make_case,
)

from osft_kernels import backend_name, linear_cross_entropy, linear_logprobs
from osft_kernels.backends import cpu, resolve_backend, torch_chunked
from osft_kernels.driver import NUM_PARTIALS, VOCAB_BLOCK

ROW_TILE = cpu.extension()[1]


def test_extension_is_built_and_is_the_default_on_cpu():
    variant, row_tile, message = cpu.extension()
    assert variant == cpu.machine_variant(), message
    assert row_tile > 0 and row_tile % 16 == 0
    assert resolve_backend("auto", torch.device("cpu")) is cpu.BACKEND
    assert backend_name("auto", torch.device("cpu")) == "cpu"
    assert resolve_backend("cpu", torch.device("cpu")).name == "cpu"


def test_missing_extension_says_how_to_build_it_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(cpu, "extension", lambda: (None, 0, "osft_kernels was installed without it; build it"))
    with pytest.raises(ValueError, match="backend 'cpu' is not available: osft_kernels was installed without it"):
        resolve_backend("cpu", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) is torch_chunked.BACKEND
    assert backend_name("auto", torch.device("cpu")) == "torch"


def test_cpu_backend_refuses_other_devices():
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors, got meta tensors"):
        resolve_backend("cpu", torch.device("meta"))


def test_bfloat16_products_follow_the_cpu():
    has_units = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu.bfloat16_products() == has_units, "a CPU with AMX or AVX512-BF16 runs the bfloat16 products"


def test_vnni_layouts():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(2 * VOCAB_BLOCK + 5, 6, generator=gen)
    cols = cpu.vnni_columns(weight)
    for c0 in range(0, weight.shape[0], VOCAB_BLOCK):
        w = min(VOCAB_BLOCK, weight.shape[0] - c0)
        block = cols[c0 * 6:(c0 + w) * 6].view(3, w, 2)  # [D / 2, w, 2]
        assert torch.equal(block[1, 4], weight[c0 + 4, 2:4])
    rows = cpu.vnni_rows(weight, VOCAB_BLOCK)
    assert rows.numel() == (weight.shape[0] + 1) * 6
    last = rows[2 * VOCAB_BLOCK * 6:].view(3, 6, 2)  # 5 rows paired with a zero row: [3, D, 2]
    assert torch.equal(last[1, :, 0], weight[-3]) and torch.equal(last[1, :, 1], weight[-2])
    assert torch.equal(last[2, :, 0], weight[-1]) and not last[2, :, 1].any()


@pytest.mark.parametrize("feature", ["plain", "everything", "row-temperature"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_many_row_tiles_and_chunks_match_float64(dtype, feature):
    """Several token chunks of several row tiles, the last ones padded, against the float64 reference."""
    d, v = 64, 2 * VOCAB_BLOCK + 907
    case = make_case((3, 2 * ROW_TILE + 35), d, v, dtype, FEATURES[feature])
    tolerance = bf16_grad_tolerance("cpu", d)
    for budget in (None, 6 * 2 * ROW_TILE * VOCAB_BLOCK):
        check_logprobs_and_entropy(case, tolerance, backend="cpu", memory_budget=budget)
        check_cross_entropy(case, "mean", tolerance, backend="cpu", memory_budget=budget)


def run_in_subprocess(code: str, **env) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, **env))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# outputs and gradients of both gradient strategies, for float32 and bfloat16, then `finish`
SCRIPT = """
import hashlib, torch
torch.set_num_threads({threads})
from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.backends import cpu
gen = torch.Generator().manual_seed(0)
digest = hashlib.sha256()
for dtype in (torch.float32, torch.bfloat16):
    h = torch.randn(300, 96, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(8 * 2048 + 300, 96, generator=gen) / 8).to(dtype).requires_grad_()
    b = torch.randn(w.shape[0], generator=gen).to(dtype).requires_grad_()
    y = torch.randint(0, w.shape[0], (300,), generator=gen)
    kw = dict(bias=b, softcap=20.0, temperature=0.8, backend="cpu")
    loss = linear_cross_entropy(h, w, y, label_smoothing=0.1, **kw)
    out = linear_logprobs(h, w, y, return_entropy=True, **kw)
    grads = torch.autograd.grad(loss + (out.logprobs * 0.3 + out.entropy).sum(), (h, w, b))
    for t in (loss, out.logprobs, out.entropy, *grads):
        digest.update(t.detach().float().numpy().tobytes())
{finish}
"""
DIGEST = "print(cpu.extension()[0], digest.hexdigest())"


@pytest.mark.slow
def test_results_do_not_depend_on_thread_count_or_run():
    one, two, again = (run_in_subprocess(SCRIPT.format(threads=n, finish=DIGEST)) for n in (1, 2, 2))
    assert one == two == again


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_narrower_vector_variants_load_and_agree(capability, tmp_path):
    """``ATEN_CPU_CAPABILITY`` lowers ATen's vector width; the extension variant follows it, and its
    results match the widest variant's to rounding (vector widths change the order of block sums)."""
    if capability == "avx2" and cpu.machine_variant() == "default":
        pytest.skip("this CPU has no AVX2")
    def save(path):
        return SCRIPT.format(threads=2, finish=f"print(cpu.extension()[0]); "
                                               f"torch.save([loss.detach(), out.entropy.detach(), *grads], {path!r})")

    narrow_path, wide_path = tmp_path / "narrow.pt", tmp_path / "wide.pt"
    assert run_in_subprocess(save(str(narrow_path)), ATEN_CPU_CAPABILITY=capability).split() == [capability]
    run_in_subprocess(save(str(wide_path)))
    narrow, wide = torch.load(narrow_path), torch.load(wide_path)
    for a, b in zip(narrow, wide):
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=2 ** -7 * b.abs().max().item())


def test_ops_check_their_arguments():
    ops = torch.ops.osft_kernels_cpu
    logits, targets, inv_temp = torch.randn(4, 10), torch.zeros(4, dtype=torch.long), torch.ones(4)
    partials, target_logit = torch.empty(4, 1, NUM_PARTIALS), torch.empty(4)
    with pytest.raises(RuntimeError, match="logits must be \\[r, w\\] of float32 or float64, got \\[4, 10\\] Half"):
        ops.buffer_stats(logits.half(), targets, 0, 10, False, False, False, partials, target_logit)
    with pytest.raises(RuntimeError, match="targets must be a contiguous CPU tensor \\[4\\] of Long, got \\[4\\] Int"):
        ops.buffer_stats(logits, targets.int(), 0, 10, False, False, False, partials, target_logit)
    with pytest.raises(RuntimeError, match="columns v0:v1 must lie in \\[0, V\\]"):
        ops.buffer_stats(logits, targets, 0, 9, False, False, False, partials, target_logit)
    with pytest.raises(RuntimeError, match="partials must be \\[r, blocks, 5\\]"):
        ops.buffer_stats(logits, targets, 0, 10, False, False, False, partials[:, :, :4], target_logit)
    with pytest.raises(RuntimeError, match="coef must be a contiguous CPU tensor \\[4, 6\\]"):
        ops.buffer_grad(logits, targets, inv_temp, 0.0, 0, 10, torch.zeros(4, 6), torch.zeros(3, 6), False, False)
    hidden, weight = torch.randn(4, 8).bfloat16(), torch.randn(10, 8).bfloat16()
    with pytest.raises(RuntimeError, match="weight_cols must be bfloat16 packed in the VNNI layout"):
        ops.fused_stats(hidden, weight, torch.empty(3).bfloat16(), None, targets, inv_temp, 0.0, 0, 10, False, False,
                        False, partials, target_logit, None)
    with pytest.raises(RuntimeError, match="an even number of rows and an even D"):
        ops.fused_stats(hidden[:3], weight, cpu.vnni_columns(weight), None, targets[:3], inv_temp[:3], 0.0, 0, 10,
                        False, False, False, partials[:3], target_logit[:3], None)
    with pytest.raises(RuntimeError, match="dz_t must be bfloat16 packed in the VNNI layout, at least 40 entries"):
        ops.fused_grads(hidden, weight, None, targets, inv_temp, 0.0, 0, 10, torch.zeros(4, 6), torch.zeros(4, 6),
                        False, False, 4, None, cpu.vnni_columns(weight), None, None, None, torch.zeros(10), None,
                        None)


def test_float32_and_bfloat16_products_agree_with_torch_backend_on_a_training_step():
    """The packaged path end to end: bf16 products vs the torch backend's float32 products, same call."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 150, 64, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(3000, 64, generator=gen) / 8).bfloat16().requires_grad_()
    targets = torch.randint(0, 3000, (2, 150), generator=gen)
    results = {}
    for backend in ("cpu", "torch"):
        loss = linear_cross_entropy(hidden, weight, targets, shift=True, backend=backend)
        results[backend] = (loss, *torch.autograd.grad(loss, (hidden, weight)))
    torch.testing.assert_close(results["cpu"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(results["cpu"][1:], results["torch"][1:]):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2 ** -6, atol=2 ** -7 * theirs.abs().max().item())
    assert linear_logprobs(hidden, weight, targets, backend="cpu").logprobs.dtype == torch.float32
