"""Modelled GPU time of the triton backend (the chunked driver) from its FLOPs and HBM bytes.

    python -m benchmarks.cost_model [--budget-mib 1024]

For each op (cross-entropy fwd+bwd, logprobs+entropy fwd+bwd with any upstream gradient, statistics
without gradients), anchor shape and device, the driver's launches are counted from its own chunk plan:
every GEMM (FLOPs, and bytes: operands, float32 output, float32 accumulators read and written) and
every epilogue kernel (bytes). A GEMM takes ``max(FLOPs / (peak * efficiency), operand and output
bytes / (HBM * COPY_EFFICIENCY))`` plus the reading of its accumulator, which cuBLAS does not hide
under the arithmetic; an epilogue kernel ``bytes / (HBM * its efficiency)``; launches run one after
another. The efficiencies were measured on an H200 (``benchmarks/gpu_checks.py``) and are assumed to
carry over to the other devices: that, launch gaps, the host's per-chunk work, clocks under load and
L2 hits (the model counts every byte at HBM) are what the model cannot know. Every time printed for a
device other than the H200 is modelled; what a GPU run must confirm is the ``measured`` column's kind
of number, from ``make bench`` on that GPU.
"""
import argparse
from dataclasses import dataclass

from osft_kernels.driver import CUDA_ROW_ALIGN, VOCAB_BLOCK, ceil_div, plan_chunks

BF16, FLOAT = 2, 4
# fractions measured on an H200 (141 GB, sm_90) with torch 2.11 / cuBLAS 13 and triton 3.6:
GEMM_EFFICIENCY = 0.70  # 684-699 TFLOP/s at the anchor shapes' GEMMs, of the 989 TFLOP/s dense bf16 datasheet peak
SMALL_GEMM_EFFICIENCY = 0.655  # 640-656 TFLOP/s when one dimension is a 2080-row chunk
SMALL_GEMM = 4096  # a GEMM with a dimension below this many is "small"
COPY_EFFICIENCY = 0.88  # 4.24 TB/s device-to-device copy, of 4.8 TB/s
STATS_EFFICIENCY = 0.56  # block statistics: 4 B per logit in 0.40 ms per 2080 x 128256 chunk
GRAD_EFFICIENCY = 0.375  # logit gradient: 6 B per logit in 0.89 ms per chunk (a barrier per tile)


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense bf16, datasheet
    hbm_tb_s: float  # datasheet


DEVICES = (Device("A100 SXM 80GB", 312.0, 2.04), Device("H100 SXM", 989.0, 3.35), Device("H200", 989.0, 4.8),
           Device("B200", 2250.0, 8.0))
ANCHOR_SHAPES = ((16384, 4096, 128256), (16384, 2048, 248320))
# measured on an H200 at the default 1 GiB budget (benchmarks/results/nvidia-h200.md), ms: (op, N, D, V) -> time
MEASURED_BUDGET = 2**30
MEASURED_H200 = {("ce", 16384, 4096, 128256): 91.8, ("logprobs_entropy", 16384, 4096, 128256): 114.1,
                 ("statistics", 16384, 4096, 128256): 26.6, ("ce", 16384, 2048, 248320): 107.7,
                 ("logprobs_entropy", 16384, 2048, 248320): 121.1, ("statistics", 16384, 2048, 248320): 31.8}
# the same work by others, as published (see shared research notes): (op, N, D, V, device) -> (ms, who)
PUBLISHED = {
    ("ce", 16384, 4096, 128256, "H200"): (73.7, "Liger-Kernel CuTe-DSL SM90 (QuACK), 6NDV"),
    ("logprobs_entropy", 16384, 4096, 128256, "H100 SXM"): (103.65, "Liger-Kernel CuTe-DSL scaled CE, V=131072"),
    ("statistics", 16384, 4096, 128256, "H100 SXM"): (23.84, "Liger-Kernel CuTe-DSL scaled CE fwd, V=131072"),
    ("logprobs_entropy", 16384, 2048, 248320, "H100 SXM"): (92.55, "Cut Cross-Entropy (gradient filtering)"),
}


@dataclass
class Cost:
    """Milliseconds of one op on one device, split by kind, and its GEMM FLOPs and HBM bytes."""

    gemm_ms: float = 0.0
    epilogue_ms: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0

    @property
    def ms(self) -> float:
        return self.gemm_ms + self.epilogue_ms


class Model:
    def __init__(self, device: Device):
        self.device = device
        self.cost = Cost()

    def gemm(self, m: int, n: int, k: int, *, out_bytes: int, accumulate: bool) -> None:
        """``[m, k] @ [k, n]`` in bf16 with an ``out_bytes`` output (read too when accumulating)."""
        flops = 2 * m * n * k
        traffic = (m * k + k * n) * BF16 + m * n * out_bytes
        accumulator = m * n * out_bytes if accumulate else 0
        efficiency = SMALL_GEMM_EFFICIENCY if min(m, n, k) < SMALL_GEMM else GEMM_EFFICIENCY
        bandwidth = self.device.hbm_tb_s * 1e12 * COPY_EFFICIENCY
        self.cost.flops += flops
        self.cost.bytes += traffic + accumulator
        self.cost.gemm_ms += (max(flops / (self.device.peak_tflops * 1e12 * efficiency), traffic / bandwidth)
                              + accumulator / bandwidth) * 1e3

    def epilogue(self, traffic: int, efficiency: float) -> None:
        self.cost.bytes += traffic
        self.cost.epilogue_ms += traffic / (self.device.hbm_tb_s * 1e12 * efficiency) * 1e3


def _plan(n, v, budget, full_rows):
    return plan_chunks(n, v, entry_bytes=FLOAT, memory_budget=budget, full_rows=full_rows, align=CUDA_ROW_ALIGN)


def _chunks(n, v, plan):
    return [(min(plan.rows, n - r0), min(plan.vocab, v - v0)) for r0 in range(0, n, plan.rows)
            for v0 in range(0, v, plan.vocab)]


def statistics(model: Model, n, d, v, budget) -> None:
    for r, w in _chunks(n, v, _plan(n, v, budget, False)):
        model.gemm(r, w, d, out_bytes=FLOAT, accumulate=False)
        model.epilogue(r * w * FLOAT + r * ceil_div(w, VOCAB_BLOCK) * 4 * FLOAT, STATS_EFFICIENCY)


def recomputing_backward(model: Model, n, d, v, budget) -> None:
    for r, w in _chunks(n, v, _plan(n, v, budget, False)):
        model.gemm(r, w, d, out_bytes=FLOAT, accumulate=False)
        model.epilogue(r * w * (FLOAT + BF16), GRAD_EFFICIENCY)
        model.gemm(r, d, w, out_bytes=FLOAT, accumulate=True)  # d_hidden += dz @ W
        model.gemm(w, d, r, out_bytes=FLOAT, accumulate=True)  # d_weight += dz^T @ H


def cross_entropy(model: Model, n, d, v, budget) -> None:
    plan = _plan(n, v, budget, True)
    if plan is None:
        statistics(model, n, d, v, budget)
        recomputing_backward(model, n, d, v, budget)
        return
    for r, _ in _chunks(n, v, plan):
        model.gemm(r, v, d, out_bytes=FLOAT, accumulate=False)
        model.epilogue(r * v * FLOAT, STATS_EFFICIENCY)
        model.epilogue(r * v * (FLOAT + BF16), GRAD_EFFICIENCY)
        model.gemm(r, d, v, out_bytes=FLOAT, accumulate=True)
        model.gemm(v, d, r, out_bytes=FLOAT, accumulate=True)


def logprobs_entropy(model: Model, n, d, v, budget) -> None:
    statistics(model, n, d, v, budget)
    recomputing_backward(model, n, d, v, budget)


OPS = {"ce": (cross_entropy, 6), "logprobs_entropy": (logprobs_entropy, 8), "statistics": (statistics, 2)}


def floor_ms(device: Device, ndv: int, n, d, v) -> float:
    """The GEMMs alone at the measured GEMM efficiency: the time a fused implementation can approach."""
    return ndv * n * d * v / (device.peak_tflops * 1e12 * GEMM_EFFICIENCY) * 1e3


def report(budget: int) -> list[str]:
    lines = [("| op | N x D x V | device | modelled ms (GEMMs + epilogues) | GEMM floor ms | vs floor | HBM GB "
              "| measured ms | published by others |"), "|---|---|---|---|---|---|---|---|---|"]
    for n, d, v in ANCHOR_SHAPES:
        for op, (run, ndv) in OPS.items():
            for device in DEVICES:
                model = Model(device)
                run(model, n, d, v, budget)
                cost = model.cost
                floor = floor_ms(device, ndv, n, d, v)
                measured = MEASURED_H200.get((op, n, d, v)) if device.name == "H200" and budget == MEASURED_BUDGET \
                    else None
                published = PUBLISHED.get((op, n, d, v, device.name))
                lines.append(
                    f"| {op} | {n} x {d} x {v} | {device.name} | {cost.ms:.1f} ({cost.gemm_ms:.1f} + "
                    f"{cost.epilogue_ms:.1f}) | {floor:.1f} ({ndv}NDV) | {cost.ms / floor:.2f}x "
                    f"| {cost.bytes / 1e9:.0f} | {'-' if measured is None else f'{measured:.1f}'} "
                    f"| {'-' if published is None else f'{published[0]:.1f} ({published[1]})'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mib", type=int, default=1024, help="the driver's memory budget (default 1 GiB)")
    args = parser.parse_args()
    print(f"bf16, memory budget {args.budget_mib} MiB; efficiencies measured on an H200: GEMM {GEMM_EFFICIENCY}, "
          f"copy {COPY_EFFICIENCY}, statistics epilogue {STATS_EFFICIENCY}, gradient epilogue {GRAD_EFFICIENCY}. "
          "Times for other devices are modelled, not measured.")
    print("\n".join(report(args.budget_mib * 2**20)))


if __name__ == "__main__":
    main()
