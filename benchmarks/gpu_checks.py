"""Checks and timings of the GPU path that need a CUDA device, in one run (a few minutes on an H100/H200).

    python -m benchmarks.gpu_checks [--tokens 16384 --hidden 4096 --vocab 128256] [--json OUT.json]

1. the device's measured ceilings: a bf16 8192^3 GEMM and a device-to-device copy;
2. the mixed-precision GEMM entry points the driver uses (bf16 x bf16 -> float32 ``mm`` and
   in-place ``addmm``) against float64;
3. batch invariance: a row's cuBLAS logits and the driver's statistics alone and inside larger batches;
4. accuracy at the anchor head, on its first 2048 tokens: loss, logprobs, entropy and gradients of
   the triton backend against float64;
5. timings at the anchor shape (median of ``triton.testing.do_bench``, with peak memory above the
   inputs): the driver's stages (logits GEMM, statistics epilogue, gradient epilogue, the two gradient
   GEMMs), fwd+bwd of cross-entropy and of logprobs+entropy at several memory budgets, statistics
   only (fused forward and chunked), and the GEMM floors (2NDV, 6NDV) measured on this device;
6. the fused forward's candidate tile configs at the anchor shape.
"""
import argparse
import json

import torch
import triton
from triton.testing import do_bench

from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.backends import triton_chunked
from osft_kernels.device_info import describe
from osft_kernels.driver import NUM_PARTIALS, VOCAB_BLOCK, Gemms, _float32_accumulator_addmm, ceil_div
from osft_kernels.row_stats import NUM_STATS
from osft_kernels.token_rows import token_rows
from osft_kernels.triton_kernels import configs

GIB = 2**30
RESULTS: dict = {}


def record(key, value):
    RESULTS[key] = value
    print(f"{key}: {value}", flush=True)


def bench(fn) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def inputs(n, d, v, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(v, d, device="cuda", generator=gen) / d ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    return hidden, weight, targets


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ a)
    record("gemm_bf16_8192_tflops", round(2 * 8192**3 / ms / 1e9, 1))
    x = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    record("copy_tb_per_s", round(2 * x.numel() / ms / 1e9, 2))


def mixed_gemms():
    gen = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(1000, 700, device="cuda", generator=gen).bfloat16()
    b = torch.randn(700, 900, device="cuda", generator=gen).bfloat16()
    exact = a.double() @ b.double()
    out = torch.empty(1000, 900, device="cuda")
    torch.mm(a, b, out_dtype=torch.float32, out=out)
    record("mm_out_dtype_rel_err", float((out.double() - exact).abs().max() / exact.abs().max()))
    record("addmm_takes_a_float32_accumulator", _float32_accumulator_addmm(torch.bfloat16))
    acc = torch.randn(1000, 900, device="cuda", generator=gen)
    expected = acc.double() + 0.5 * exact
    Gemms(torch.bfloat16, acc.device).accumulate(acc, a, b, 0.5)
    record("driver_accumulate_rel_err", float((acc.double() - expected).abs().max() / expected.abs().max()))


def invariance(d, v):
    hidden, weight, targets = inputs(4096, d, v, seed=2)
    full = hidden @ weight[:VOCAB_BLOCK].t()
    equal = {m: bool(torch.equal(torch.mm(hidden[:m], weight[:VOCAB_BLOCK].t()), full[:m]))
             for m in (16, 64, 256, 1024)}
    record("cublas_rows_bitwise_equal_by_batch", equal)
    weight.requires_grad_()
    results = {}
    for label, grad in (("fused_forward", False), ("chunked_driver", True)):
        with torch.set_grad_enabled(grad):
            big = linear_logprobs(hidden, weight, targets, return_entropy=True)
            small = linear_logprobs(hidden[:37], weight, targets[:37], return_entropy=True)
        results[label] = bool(torch.equal(big.logprobs[:37], small.logprobs)
                              and torch.equal(big.entropy[:37], small.entropy))
    record("statistics_bitwise_equal_alone_and_in_4096_rows", results)
    runs = [torch.autograd.grad(linear_cross_entropy(hidden, weight, targets), weight)[0] for _ in range(3)]
    record("cross_entropy_grad_bitwise_reproducible", all(torch.equal(runs[0], g) for g in runs[1:]))
    up = torch.randn(4096, device="cuda")
    runs = [torch.autograd.grad((linear_logprobs(hidden, weight, targets).logprobs * up).sum(), weight)[0]
            for _ in range(3)]
    record("logprobs_grad_bitwise_reproducible", all(torch.equal(runs[0], g) for g in runs[1:]))


def accuracy(d, v):
    hidden, weight, targets = inputs(2048, d, v, seed=3)
    targets[::7] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    up = torch.randn(2048, device="cuda"), torch.randn(2048, device="cuda")
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    valid = targets != -100
    logp64 = torch.log_softmax(h64 @ w64.t(), -1)
    lp64 = torch.where(valid, logp64.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ent64 = torch.where(valid, -(logp64.exp() * logp64).sum(-1), 0.0)
    ce64 = -lp64.sum() / valid.sum()
    ref_lp_grads = torch.autograd.grad((lp64 * up[0]).sum() + (ent64 * up[1]).sum(), (h64, w64), retain_graph=True)
    ref_ce_grads = torch.autograd.grad(ce64, (h64, w64))

    def rel(a, e):
        return float((a.double() - e).norm() / e.norm())

    out = linear_logprobs(h, w, targets, return_entropy=True)
    lp_grads = torch.autograd.grad((out.logprobs * up[0]).sum() + (out.entropy * up[1]).sum(), (h, w))
    ce = linear_cross_entropy(h, w, targets)
    ce_grads = torch.autograd.grad(ce, (h, w))
    with torch.no_grad():
        scored = linear_logprobs(hidden, weight, targets, return_entropy=True)
    record("accuracy_vs_float64_rel_norm_err", {
        "logprobs_max_abs": float((out.logprobs.double() - lp64).abs().max()),
        "entropy_max_abs": float((out.entropy.double() - ent64).abs().max()),
        "scoring_logprobs_max_abs": float((scored.logprobs.double() - lp64).abs().max()),
        "scoring_entropy_max_abs": float((scored.entropy.double() - ent64).abs().max()),
        "ce_abs": float((ce.double() - ce64).abs()),
        "logprobs_d_hidden": rel(lp_grads[0], ref_lp_grads[0]), "logprobs_d_weight": rel(lp_grads[1], ref_lp_grads[1]),
        "ce_d_hidden": rel(ce_grads[0], ref_ce_grads[0]), "ce_d_weight": rel(ce_grads[1], ref_ce_grads[1])})


def stages(n, d, v):
    """The driver's per-chunk work at the default budget's square chunk and at full-vocabulary rows."""
    hidden, weight, targets = inputs(n, d, v)
    for label, r, w in (("square", min(16384, n), min(16384, v)), ("full_rows", 2080, v)):
        record(f"stage_ms_{label}_{r}x{w}", _chunk_stages(hidden[:r], weight[:w], targets[:r], v))


STATS_CANDIDATES = [(1, 1024, 4), (1, 2048, 8), (2, 1024, 4), (2, 1024, 8), (4, 512, 4), (4, 1024, 8), (8, 256, 4),
                    (8, 512, 8)]
GRAD_CANDIDATES = [(1, 1024, 4), (1, 2048, 8), (1, 4096, 8), (2, 1024, 8), (2, 2048, 8), (4, 512, 4), (4, 1024, 8),
                   (8, 512, 8)]


def _time_or_error(fn) -> float | str:
    try:
        return round(bench(fn), 3)
    except Exception as error:  # noqa: BLE001 (a candidate that does not compile or launch is reported)
        return f"failed: {type(error).__name__}"


def _chunk_stages(h, wt, t, v):
    (r, d), w = h.shape, wt.shape[0]
    logits = torch.empty(r, w, device="cuda")
    gemm = bench(lambda: torch.mm(h, wt.t(), out_dtype=torch.float32, out=logits))
    partials = torch.empty(r, ceil_div(w, VOCAB_BLOCK), NUM_PARTIALS, device="cuda")
    target_logit = torch.zeros(r, device="cuda")
    inv_t = torch.ones(r, device="cuda")
    stats = torch.zeros(r, NUM_STATS, device="cuda")
    coef = torch.randn(r, NUM_STATS, device="cuda") * 1e-3
    dz = torch.empty(r, w, device="cuda", dtype=torch.bfloat16)  # separate, so that the timing can repeat
    stats_ms = {"x".join(map(str, c)): _time_or_error(lambda c=c: triton_chunked.launch_block_stats(
        logits, partials, target_logit, t, inv_t, None, None, 0, entropy=True, mean=False, square=False,
        config=configs.EpilogueConfig(*c))) for c in STATS_CANDIDATES}
    grad_ms = {"x".join(map(str, c)): _time_or_error(lambda c=c: triton_chunked.launch_logit_grad(
        logits, dz, t, inv_t, stats, coef, None, None, 0, v, entropy=True, mean=False,
        config=configs.EpilogueConfig(*c))) for c in GRAD_CANDIDATES}
    d_h = torch.zeros(r, d, device="cuda")
    d_w = torch.zeros(w, d, device="cuda")
    gemms = Gemms(torch.bfloat16, h.device)
    dh_ms = bench(lambda: gemms.accumulate(d_h, dz, wt, 1.0))
    dw_ms = bench(lambda: gemms.accumulate(d_w, dz.t(), h, 1.0))
    flops = 2 * r * d * w
    return {"logits_gemm": round(gemm, 3), "logits_gemm_tflops": round(flops / gemm / 1e9, 1),
            "d_hidden_gemm": round(dh_ms, 3), "d_hidden_tflops": round(flops / dh_ms / 1e9, 1),
            "d_weight_gemm": round(dw_ms, 3), "d_weight_tflops": round(flops / dw_ms / 1e9, 1),
            "copy_floor_ms_4B_per_entry": round(r * w * 4 / 4.2e9, 3),
            "block_stats_ms (rows x tile x warps)": stats_ms, "logit_grad_ms (rows x tile x warps)": grad_ms}


def end_to_end(n, d, v):
    hidden, weight, targets = inputs(n, d, v)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    up = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    ndv = n * d * v
    floor = _gemm_floors(hidden, weight)
    record("gemm_floor_ms", {k: round(x, 2) for k, x in floor.items()})
    for budget in (512 * 2**20, GIB, 2 * GIB):
        def ce(budget=budget):
            return torch.autograd.grad(linear_cross_entropy(h, w, targets, memory_budget=budget), (h, w))

        def lpe(budget=budget):
            out = linear_logprobs(h, w, targets, return_entropy=True, memory_budget=budget)
            return torch.autograd.grad((out.logprobs * up[0]).sum() + (out.entropy * up[1]).sum(), (h, w))

        for label, fn, ndv_flops in (("ce", ce, 6), ("logprobs_entropy", lpe, 8)):
            mem = peak_gib(fn)
            ms = bench(fn)
            record(f"{label}_fwd_bwd_budget_{budget // 2**20}MiB", {
                "ms": round(ms, 2), "peak_gib": round(mem, 2), "tflops_counted": round(ndv_flops * ndv / ms / 1e9, 1),
                "vs_6ndv_floor": round(ms / floor["6ndv"], 3)})
    rows = token_rows(hidden, targets, temperature=1.0, token_weights=None, ignore_index=-100, shift=False)
    with torch.no_grad():
        fused = bench(lambda: triton_chunked.fused_forward_stats(rows, weight, None, None, entropy=True, mean=False,
                                                                    square=False))
        chunked = bench(lambda: _chunked_stats(rows, weight))
    record("statistics_only_ms", {"fused_forward": round(fused, 2), "chunked_driver": round(chunked, 2),
                                  "vs_2ndv_floor": {"fused": round(fused / floor["2ndv"], 3),
                                                    "chunked": round(chunked / floor["2ndv"], 3)}})


def _gemm_floors(hidden, weight) -> dict[str, float]:
    """Milliseconds of the logits GEMM (2NDV) and of it plus both gradient GEMMs (6NDV), bf16 in and out."""
    logits = torch.empty(hidden.shape[0], weight.shape[0], device="cuda", dtype=torch.bfloat16)
    forward = bench(lambda: torch.mm(hidden, weight.t(), out=logits))
    return {"2ndv": forward, "6ndv": forward + bench(lambda: logits @ weight) + bench(lambda: logits.t() @ hidden)}


def _chunked_stats(rows, weight):
    from osft_kernels.driver import forward_stats
    return forward_stats(triton_chunked.TritonEpilogue(), rows, weight, None, None, entropy=True, mean=False,
                         square=False, memory_budget=None)


def forward_configs(n, d, v):
    hidden, weight, targets = inputs(n, d, v)
    rows = token_rows(hidden, targets, temperature=1.0, token_weights=None, ignore_index=-100, shift=False)
    candidates = [(128, 128, 32, 8, 4), (128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 8, 3),
                  (128, 64, 32, 8, 3), (64, 64, 64, 8, 3), (128, 128, 64, 8, 3)]
    floor = bench(lambda: hidden @ weight.t())
    timings = {}
    arch = configs.device_arch(hidden.device)
    saved = dict(configs.FORWARD_CONFIGS[arch])
    for candidate in candidates:
        configs.FORWARD_CONFIGS[arch]["half"] = configs._forward(*candidate)
        ms = _time_or_error(lambda: triton_chunked.fused_forward_stats(rows, weight, None, None, entropy=True,
                                                                          mean=False, square=False))
        timings["x".join(map(str, candidate))] = round(ms / floor, 3) if isinstance(ms, float) else ms
    configs.FORWARD_CONFIGS[arch].update(saved)
    record("fused_forward_config_vs_2ndv_gemm (BLOCK_N x BLOCK_V x BLOCK_D x warps x stages)", timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--json", default=None)
    parser.add_argument("--steps", nargs="+", default=None, help="run only these steps (default: all)")
    args = parser.parse_args()
    n, d, v = args.tokens, args.hidden, args.vocab
    record("device", f"{describe(torch.device('cuda'))}; torch {torch.__version__}, triton {triton.__version__}")
    record("shape", {"N": n, "D": d, "V": v, "dtype": "bfloat16"})
    steps = {"ceilings": ceilings, "mixed_gemms": mixed_gemms, "invariance": lambda: invariance(d, v),
             "accuracy": lambda: accuracy(d, v), "stages": lambda: stages(n, d, v),
             "end_to_end": lambda: end_to_end(n, d, v), "forward_configs": lambda: forward_configs(n, d, v)}
    for name, step in steps.items():
        if args.steps and name not in args.steps:
            continue
        try:
            step()
        except Exception as error:  # noqa: BLE001 (reported; every step is independent)
            record(f"error in {name}", f"{type(error).__name__}: {error}"[:2000])
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
