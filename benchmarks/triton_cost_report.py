"""Static cost of the triton kernels for one head shape: what each kernel does by construction.

    python benchmarks/triton_cost_report.py --tokens 16384 --hidden 4096 --vocab 128256 [--arch 90]

For each kernel launch of a training step (forward statistics, then the backward in its default
and deterministic schedules): tile counts, FLOPs (tile count x tile work, padding included), and
global-memory traffic two ways: ``tile traffic`` counts every tile load, store and float32
read-modify-write (or atomic) as issued, served by L2 or HBM; ``compulsory`` counts each input
once, the HBM floor. The FLOPs are set against the ``6 N D V``
of an unfused forward + backward, and the default configs' registers and shared memory come from
an ahead-of-time compile (no GPU needed; ``--no-compile`` skips it). Nothing here is a timing: the
``ms at peak`` column is FLOPs / the device's dense peak, the floor a GPU measurement would sit above.
"""
import argparse
import os
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # the compile needs real kernels

import triton

from osft_kernels.triton_kernels import configs

DENSE_PEAK_TFLOPS = {90: ("H100 SXM bf16 dense", 989.0), 80: ("A100 bf16 dense", 312.0)}
HALF, FLOAT = 2, 4  # bytes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Launch:
    kernel: str
    config: triton.Config | None
    tiles: int
    flops: int
    traffic: int
    compulsory: int


def launches(n: int, d: int, v: int, arch: int) -> list[Launch]:
    operands = (n + v) * d * HALF
    partials = 4 * FLOAT * n * _cdiv(v, configs.CHUNK_COLUMNS)

    def launch(name, config, products, accumulators, extra_traffic=0):
        """``products``: GEMMs per tile after the logits; ``accumulators``: float32 rows updated per tile."""
        bn, bv, bd = (config.kwargs[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D"))
        tiles = _cdiv(n, bn) * _cdiv(v, bv)
        d_pad = _cdiv(d, bd) * bd
        # the logits load an H and a W tile; each product reloads the operand it multiplies
        loads = (bn + bv) * d_pad * HALF + products * max(bn, bv) * d_pad * HALF
        read_modify_write = sum(rows * d_pad * FLOAT * 2 for rows in accumulators)
        return Launch(name, config, tiles, tiles * 2 * bn * bv * d_pad * (1 + products),
                      tiles * (loads + read_modify_write) + extra_traffic, operands + extra_traffic)

    fwd = configs.FORWARD_CONFIGS[arch][0]
    bwd = configs.BACKWARD_CONFIGS[arch][0]
    det = configs.DETERMINISTIC_BACKWARD_CONFIG[arch]
    return [
        launch("row_partials", fwd, 0, (), partials),
        Launch("merge_partials", None, _cdiv(n, 128), 0, partials + 4 * FLOAT * n, partials + 4 * FLOAT * n),
        launch("logit_grad[fused]", bwd, 2, (bwd.kwargs["BLOCK_N"], bwd.kwargs["BLOCK_V"])),
        launch("logit_grad[own_rows]", det, 1, (det.kwargs["BLOCK_N"],)),
        launch("logit_grad[own_cols]", det, 1, (det.kwargs["BLOCK_V"],)),
    ]


def _key(kernel: str, config: triton.Config | None):
    return kernel, None if config is None else (tuple(config.kwargs.items()), config.num_warps, config.num_stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--arch", type=int, choices=sorted(DENSE_PEAK_TFLOPS), default=90)
    parser.add_argument("--no-compile", action="store_true", help="skip the registers/shared-memory compile")
    args = parser.parse_args()
    n, d, v, arch = args.tokens, args.hidden, args.vocab, args.arch
    bound = 6 * n * d * v
    device, peak = DENSE_PEAK_TFLOPS[arch]
    resources = {}
    if not args.no_compile:
        from osft_kernels.triton_kernels import compile_check
        resources = {(r.kernel, None if r.kernel == "merge_partials" else
                      (tuple(r.config.items()), r.num_warps, r.num_stages)): r for r in compile_check.compile_all(arch)}

    print(f"N={n} D={d} V={v}, bfloat16 operands, sm_{arch}; 6NDV = {bound / 1e12:.2f} TFLOP; "
          f"full logits would be {n * v * FLOAT / 2**30:.2f} GiB in float32")
    print(f"{'kernel':22} {'tiles':>7} {'BNxBVxBD/warps/stages':22} {'TFLOP':>7} {'x 6NDV':>6} "
          f"{'tile traffic GiB':>16} {'compulsory GiB':>14} {'ms at peak':>10} {'regs':>5} {'smem KiB':>8}")
    for launch in launches(n, d, v, arch):
        config = launch.config
        shape = "-"
        if config is not None:
            tiles = "x".join(str(config.kwargs[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D"))
            shape = f"{tiles}/{config.num_warps}/{config.num_stages}"
        info = resources.get(_key(launch.kernel, config))
        regs = f"{info.registers:>5} {info.shared_bytes / 1024:>8.0f}" if info else f"{'-':>5} {'-':>8}"
        print(f"{launch.kernel:22} {launch.tiles:>7} {shape:22} {launch.flops / 1e12:>7.2f} "
              f"{launch.flops / bound:>6.2f} "
              f"{launch.traffic / 2**30:>16.1f} {launch.compulsory / 2**30:>14.2f} "
              f"{launch.flops / (peak * 1e12) * 1e3:>10.2f} {regs}")
    print(f"Per step: default = row_partials + merge + logit_grad[fused] (8NDV); deterministic = row_partials + "
          f"merge + own_rows + own_cols (10NDV). 'ms at peak' uses {device} = {peak:.0f} TFLOP/s and is a floor, "
          f"not a measurement. To measure on a GPU: time each launch with triton.testing.do_bench at this shape, "
          f"and compare fwd+bwd against torch's linear_cross_entropy and the unfused matmul + cross_entropy.")


if __name__ == "__main__":
    main()
