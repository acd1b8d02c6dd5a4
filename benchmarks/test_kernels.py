"""Kernel benchmarks: ``pytest benchmarks/ --benchmark-only`` (``make bench`` also writes the report).

One pytest-benchmark group per (operation, shape, dtype), one benchmark per implementation, so
``--benchmark-compare`` lines up across commits. For each implementation, in order:

1. correctness guard: on the first 256 tokens of the benchmark inputs (full D and V) its outputs
   and gradients are compared with a float64 evaluation; a mismatch is recorded as such and the
   implementation is not timed (``gemm_ceiling``, the bare GEMMs, computes no loss and is not checked);
2. one warm-up call at the full shape (compilation, autotuning, allocator) during which the peak
   memory above the inputs is measured: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the
   allocator's events recorded by ``torch.profiler(profile_memory=True)``, summed in time order (a
   ``TorchDispatchMode`` tracker would make ``torch.compile`` fall back to eager);
3. timed rounds (wall clock; on GPU each call ends with ``torch.cuda.synchronize()``).

Shapes on CPU are scaled down (tokens, hidden size) so that a full run takes minutes; the report
says so. ``BENCH_SMOKE=1`` runs tiny shapes, ``BENCH_ROUNDS`` sets the timed rounds (default 2).
The report splits the peak memory into the returned gradients and the working memory on top.
"""
import importlib.metadata
import os
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.implementations import CEILINGS, FLOPS_PER_NDV, IMPLEMENTATIONS, OPS, unavailable
from osft_kernels.device_info import describe

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
GUARD_TOKENS = 256
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))

SWEEP_OPS = ("ce",) if DEVICE.type == "cpu" else ("ce", "logprobs_entropy")
if os.environ.get("BENCH_SMOKE") == "1":
    # a seconds-long run of the whole harness, for checking it works
    MAIN, SWEEP = [(256, 64, 1000)], [(256, 64, 1000), (256, 64, 3001)]
elif DEVICE.type == "cuda":
    # real heads: Llama-3 8B (Liger's anchor shape), Qwen3.5 (Cut Cross-Entropy's via TRL), Gemma-2 2B,
    # Qwen2.5-7B, SmolLM2; and a vocabulary sweep
    MAIN = [(16384, 4096, 128256), (16384, 2048, 248320), (8192, 2304, 256000), (8192, 3584, 152064),
            (16384, 576, 49152)]
    SWEEP = [(8192, 2048, v) for v in (32000, 65536, 128256, 262144)]
else:
    # scaled down for a 2-core CPU: the target shape, and a vocabulary sweep at fewer tokens
    MAIN = [(8192, 1024, 32000)]
    SWEEP = [(2048, 512, v) for v in (32000, 65536, 152064)]
CASES = [(op, shape) for shape in MAIN for op in OPS] + [(op, shape) for shape in SWEEP if shape not in MAIN
                                                          for op in SWEEP_OPS]


def environment() -> dict:
    """The device and the versions of everything compared, for the report's header."""
    device = describe(DEVICE)
    versions = {"torch": torch.__version__}
    for package in ("triton", "liger-kernel", "cut-cross-entropy", "trl", "osft-kernels"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"device_name": device, "versions": versions}


def make_inputs(n, d, v, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(DEVICE, DTYPE)
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5).to(DEVICE, DTYPE)
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    upstream = (torch.randn(n, generator=gen).to(DEVICE), torch.randn(n, generator=gen).to(DEVICE))
    return hidden, weight, targets, upstream


def call(name, op, hidden, weight, targets, upstream):
    leaves = [x.detach().requires_grad_(op != "logprobs_forward") for x in (hidden, weight)]
    out = IMPLEMENTATIONS[name](op, *leaves, targets, upstream)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return out


def guard(name, op, inputs) -> str | None:
    """Compare with float64 on the first GUARD_TOKENS tokens; the mismatch message, or None."""
    hidden, weight, targets, upstream = inputs
    rows = slice(0, min(GUARD_TOKENS, hidden.shape[0]))
    small = (hidden[rows], weight, targets[rows], tuple(u[rows] for u in upstream))
    ours = call(name, op, *small)
    expected = call("naive", op, small[0].double(), small[1].double(), small[2], tuple(u.double() for u in small[3]))
    tolerance = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
    for index, (a, e) in enumerate(zip(ours, expected)):
        error = (a.double() - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
        if not error <= tolerance:
            return f"output {index} differs from float64 by {error:.2e} of its largest value (> {tolerance})"
    return None


def peak_memory(name, op, inputs) -> int:
    """Bytes allocated above the inputs during one call (gradients included)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call(name, op, *inputs)
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call(name, op, *inputs)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.nbytes() != 0), key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("op,shape", CASES, ids=[f"{op}-N{n}-D{d}-V{v}" for op, (n, d, v) in CASES])
def test_kernel(benchmark, op, shape, name):
    n, d, v = shape
    reason = unavailable(name, op, DEVICE)
    if reason:
        pytest.skip(f"{name}: {reason}")
    benchmark.group = f"{op} N={n} D={d} V={v} {str(DTYPE).removeprefix('torch.')}"
    benchmark.extra_info.update(environment(), op=op, n=n, d=d, v=v, dtype=str(DTYPE), device=DEVICE.type,
                                implementation=name,
                                flops=FLOPS_PER_NDV[op] * n * d * v,
                                unavailable={other: why for other in IMPLEMENTATIONS
                                             if (why := unavailable(other, op, DEVICE))})
    inputs = make_inputs(n, d, v)
    mismatch = None if name in CEILINGS else guard(name, op, inputs)
    if mismatch:
        benchmark.extra_info["mismatch"] = mismatch
        benchmark.pedantic(lambda: None, rounds=1)  # recorded for the report, not timed
        warnings.warn(f"{name} {op} N={n} D={d} V={v}: {mismatch}; not timed", stacklevel=1)
        return
    peak = peak_memory(name, op, inputs)  # also the warm-up call
    gradient_bytes = 0 if op == "logprobs_forward" else (n + v) * d * inputs[0].element_size()
    benchmark.extra_info.update(peak_bytes=peak, gradient_bytes=gradient_bytes)
    benchmark.pedantic(call, args=(name, op, *inputs), rounds=ROUNDS, iterations=1)
