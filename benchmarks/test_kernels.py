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

Every 7th target is ``ignore_index`` (-100), as padding in real batches: cross-entropy is the mean
over the other tokens and the per-token outputs are 0 there (see ``benchmarks.implementations``).
On GPU the inputs are bfloat16; on CPU every case runs in float32 and in bfloat16, with shapes scaled
down (tokens, hidden size) so that a full run takes about half an hour on 2 cores; the report says so.
``BENCH_SMOKE=1`` runs tiny shapes, ``BENCH_ROUNDS`` sets the timed rounds (default 2 on GPU, 1 on CPU).
The report splits the peak memory into the returned gradients and the working memory on top.
"""
import functools
import importlib.metadata
import os
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.implementations import CEILINGS, FLOPS_PER_NDV, IGNORE_INDEX, IMPLEMENTATIONS, OPS, unavailable
from osft_kernels.backends import cpu
from osft_kernels.device_info import describe

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.bfloat16,) if DEVICE.type == "cuda" else (torch.float32, torch.bfloat16)
GUARD_TOKENS = 256
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # of the largest value, against float64
IGNORE_EVERY = 7  # targets[::IGNORE_EVERY] = IGNORE_INDEX
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2" if DEVICE.type == "cuda" else "1"))

SWEEP_OPS = ("ce", "logprobs_entropy")
MAIN_OPS = (*SWEEP_OPS, "logprobs_forward")  # on CPU; logprobs with gradients costs about what logprobs_entropy does
if os.environ.get("BENCH_SMOKE") == "1":
    # a seconds-long run of the whole harness, for checking it works
    MAIN_OPS, MAIN, SWEEP = OPS, [(256, 64, 1000)], [(256, 64, 1000), (256, 64, 3001)]
elif DEVICE.type == "cuda":
    # real heads: Llama-3 8B (Liger's anchor shape), Qwen3.5 (Cut Cross-Entropy's via TRL), Gemma-2 2B,
    # Qwen2.5-7B, SmolLM2; and a vocabulary sweep
    MAIN = [(16384, 4096, 128256), (16384, 2048, 248320), (8192, 2304, 256000), (8192, 3584, 152064),
            (16384, 576, 49152)]
    MAIN_OPS = OPS
    SWEEP = [(8192, 2048, v) for v in (32000, 65536, 128256, 262144)]
else:
    # scaled down for 2 cores (about 30 minutes in all, float32 and bfloat16, with BENCH_ROUNDS=1): a
    # Llama-2-sized vocabulary, and larger ones at fewer tokens (each 2x the FLOPs and logits of the first)
    MAIN = [(4096, 1024, 32000)]
    SWEEP = [(2048, 1024, 131072), (1024, 1024, 262144)]
CASES = [(op, shape) for shape in MAIN for op in MAIN_OPS] + [(op, shape) for shape in SWEEP if shape not in MAIN
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
    return {"device_name": device, "versions": versions, "cpu_backend": cpu_backend()}


def cpu_backend() -> dict | None:
    """What the cpu backend (``ours_cpu``) runs on this machine: its extension variant and the GEMM
    operand dtype for each input dtype; None on GPU or without the extension."""
    if DEVICE.type != "cpu" or not cpu.available():
        return None
    bfloat16 = "bfloat16 products (oneDNN brgemm)" if cpu.bfloat16_products() else "float32 products"
    return {"variant": cpu.extension()[0], "compute": {"torch.float32": "float32 products", "torch.bfloat16": bfloat16}}


@functools.lru_cache(maxsize=1)
def _float32_inputs(n, d, v, seed):
    """The inputs in float32 on the host, kept for the next test (the implementations of a case run in turn)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) / d ** 0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::IGNORE_EVERY] = IGNORE_INDEX
    upstream = (torch.randn(n, generator=gen), torch.randn(n, generator=gen))
    return hidden, weight, targets, upstream


def make_inputs(n, d, v, dtype, seed=0):
    hidden, weight, targets, upstream = _float32_inputs(n, d, v, seed)
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE), tuple(u.to(DEVICE) for u in upstream)


def call(name, op, hidden, weight, targets, upstream):
    leaves = [x.detach().requires_grad_(op != "logprobs_forward") for x in (hidden, weight)]
    out = IMPLEMENTATIONS[name](op, *leaves, targets, upstream)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return out


_reference: dict[tuple, tuple] = {}


def reference(op, small) -> tuple:
    """The float64 evaluation of ``small`` (naive on the inputs' values in float64), computed once per
    case: the last one is kept for the case's next implementation."""
    hidden, weight, targets, upstream = small
    key = (op, *hidden.shape, *weight.shape, hidden.dtype)
    if key not in _reference:
        _reference.clear()
        _reference[key] = call("naive", op, hidden.double(), weight.double(), targets,
                               tuple(u.double() for u in upstream))
    return _reference[key]


def guard(name, op, inputs) -> str | None:
    """Compare with float64 on the first GUARD_TOKENS tokens; the mismatch message, or None."""
    hidden, weight, targets, upstream = inputs
    rows = slice(0, min(GUARD_TOKENS, hidden.shape[0]))
    small = (hidden[rows], weight, targets[rows], tuple(u[rows] for u in upstream))
    ours = call(name, op, *small)
    expected = reference(op, small)
    tolerance = TOLERANCE[hidden.dtype]
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


# the implementations vary fastest, then the dtype: the inputs and the float64 reference are made once per case
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(dtype).removeprefix("torch.") for dtype in DTYPES])
@pytest.mark.parametrize("op,shape", CASES, ids=[f"{op}-N{n}-D{d}-V{v}" for op, (n, d, v) in CASES])
def test_kernel(benchmark, op, shape, dtype, name):
    n, d, v = shape
    reason = unavailable(name, op, DEVICE)
    if reason:
        pytest.skip(f"{name}: {reason}")
    benchmark.group = f"{op} N={n} D={d} V={v} {str(dtype).removeprefix('torch.')}"
    inputs = make_inputs(n, d, v, dtype)
    benchmark.extra_info.update(environment(), op=op, n=n, d=d, v=v, dtype=str(dtype), device=DEVICE.type,
                                implementation=name,
                                flops=FLOPS_PER_NDV[op] * n * d * v,
                                ignore_index=IGNORE_INDEX, ignore_every=IGNORE_EVERY,
                                ignored_tokens=int((inputs[2] == IGNORE_INDEX).sum()),
                                unavailable={other: why for other in IMPLEMENTATIONS
                                             if (why := unavailable(other, op, DEVICE))})
    mismatch = None if name in CEILINGS else guard(name, op, inputs)
    if mismatch:
        benchmark.extra_info["mismatch"] = mismatch
        benchmark.pedantic(lambda: None, rounds=1)  # recorded for the report, not timed
        warnings.warn(f"{name} {op} N={n} D={d} V={v} {dtype}: {mismatch}; not timed", stacklevel=1)
        return
    peak = peak_memory(name, op, inputs)  # also the warm-up call
    gradient_bytes = 0 if op == "logprobs_forward" else (n + v) * d * inputs[0].element_size()
    benchmark.extra_info.update(peak_bytes=peak, gradient_bytes=gradient_bytes)
    benchmark.pedantic(call, args=(name, op, *inputs), rounds=ROUNDS, iterations=1)
