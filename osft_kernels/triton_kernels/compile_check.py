"""Ahead-of-time compilation of every kernel for a GPU architecture, on any machine.

``python -m osft_kernels.triton_kernels.compile_check [--arch 80 89 90 100 120] [--json]`` compiles
each kernel with every feature switched on (the largest variant; bfloat16 operands, and float32
operands with 3xTF32 for the fused forward) and reports what the compiler produced: tensor-core
instructions in the fused forward's PTX (``mma.sync`` on sm_80/89/120, ``wgmma`` on sm_90,
``tcgen05.mma`` on sm_100), shared memory against the architecture's per-block limit, and registers
and spills from ``cuobjdump --dump-resource-usage`` on the cubin: ptxas places spilled registers in
the stack frame, so ``STACK`` (plus ``LOCAL``) above zero means the kernel spills. No GPU is needed,
but the kernels must not be interpreted: run it without ``TRITON_INTERPRET=1``.
"""
import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..driver import NUM_PARTIALS, VOCAB_BLOCK
from ..row_stats import NUM_STATS
from . import configs
from .epilogue import block_stats_kernel, logit_grad_kernel
from .forward import merge_partials_kernel, row_partials_kernel

ARCHITECTURES = (80, 89, 90, 100, 120)
# bytes of shared memory one block may use: A100, L40/RTX 4090, H100/H200, B200, RTX 5090
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
TENSOR_CORE_INSTRUCTION = {80: r"mma\.sync", 89: r"mma\.sync", 90: r"wgmma", 100: r"tcgen05\.mma",
                           120: r"mma\.sync"}
ALIGNED = 16  # pointers, D and the row strides are assumed 16-aligned, as Triton specializes them at run time
_ALIGNED_SCALARS = ("D", "stride_hn", "stride_wv", "stride_l", "stride_dz", "stride_p")


@dataclass
class Compiled:
    kernel: str
    arch: int
    config: dict
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    spill_bytes: int
    tensor_core_instructions: int

    def problems(self) -> list[str]:
        """What makes this kernel unfit for its architecture (empty when it is fine)."""
        found = []
        if self.tensor_core_instructions == 0:
            found.append(f"no {TENSOR_CORE_INSTRUCTION[self.arch]} instruction")
        if self.shared_bytes > SHARED_MEMORY_LIMIT[self.arch]:
            found.append(f"shared memory {self.shared_bytes} B > {SHARED_MEMORY_LIMIT[self.arch]} B")
        if self.spill_bytes:
            found.append(f"{self.spill_bytes} B of stack/local memory per thread (register spills)")
        return found


def _variants(arch: int):
    """(label, kernel, signature, constexprs, launch config, has tensor cores) of every kernel to compile."""
    half, single = configs.FORWARD_CONFIGS[arch]["half"], configs.FORWARD_CONFIGS[arch]["float32"]
    forward = {"hidden_ptr": "*bf16", "weight_ptr": "*bf16", "bias_ptr": "*bf16", "targets_ptr": "*i64",
               "inv_temp_ptr": "*fp32", "stats_ptr": "*fp32", "partials_ptr": "*fp32", "N": "i32", "D": "i32",
               "V": "i32", "stride_hn": "i32", "stride_wv": "i32", "softcap": "fp32"}
    layout = {"STATS": NUM_STATS, "PARTIALS": NUM_PARTIALS}
    features = {"HAS_BIAS": True, "HAS_SOFTCAP": True, "MEAN": True, "ENTROPY": True, "SQUARE": True, "UPCAST": False,
                **layout}
    yield ("row_partials[bf16]", row_partials_kernel, forward, dict(features, INPUT_PRECISION="ieee", **half.kwargs),
           half, True)
    fp32 = dict(forward, hidden_ptr="*fp32", weight_ptr="*fp32", bias_ptr="*fp32")
    yield ("row_partials[fp32]", row_partials_kernel, fp32, dict(features, INPUT_PRECISION="tf32x3", **single.kwargs),
           single, True)
    merge = {"partials_ptr": "*fp32", "stats_ptr": "*fp32", "N": "i32", "V": "i32", "num_chunks": "i32"}
    yield ("merge_partials", merge_partials_kernel, merge,
           {"BLOCK": 128, "MEAN": True, "ENTROPY": True, "SQUARE": True, **layout},
           triton.Config({}, num_warps=4, num_stages=1), False)
    flags = {"HAS_BIAS": True, "HAS_SOFTCAP": True, "MEAN": True, "ENTROPY": True}
    stats_config, grad_config = configs.STATS_EPILOGUE, configs.GRAD_EPILOGUE
    stats = {"logits_ptr": "*fp32", "stride_l": "i32", "bias_ptr": "*fp32", "targets_ptr": "*i64",
             "inv_temp_ptr": "*fp32", "partials_ptr": "*fp32", "stride_p": "i32", "target_logit_ptr": "*fp32",
             "R": "i32", "W": "i32", "v0": "i32", "softcap": "fp32"}
    for label, square, config in (("block_stats", False, stats_config),
                                  ("block_stats[square]", True, configs.SQUARE_STATS_EPILOGUE)):
        yield (label, block_stats_kernel, stats,
               dict(flags, SQUARE=square, PARTIALS=NUM_PARTIALS, BLOCK=VOCAB_BLOCK, TILE=config.tile, ROWS=config.rows),
               triton.Config({}, num_warps=config.warps, num_stages=3), False)
    grad = {"logits_ptr": "*fp32", "stride_l": "i32", "dz_ptr": "*bf16", "stride_dz": "i32", "bias_ptr": "*fp32",
            "targets_ptr": "*i64", "inv_temp_ptr": "*fp32", "stats_ptr": "*fp32", "coef_ptr": "*fp32", "R": "i32",
            "W": "i32", "v0": "i32", "V": "i32", "softcap": "fp32"}
    yield ("logit_grad[bf16]", logit_grad_kernel, grad,
           dict(flags, STATS=NUM_STATS, TILE=grad_config.tile, ROWS=grad_config.rows),
           triton.Config({}, num_warps=grad_config.warps, num_stages=3), False)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", text)}


def compile_kernel(arch: int, label, kernel, signature, constexprs, config, tensor_cores: bool) -> Compiled:
    full_signature = dict(signature, **{name: "constexpr" for name in constexprs})
    aligned = [i for i, name in enumerate(kernel.arg_names)
               if name in full_signature and (full_signature[name].startswith("*")
                                              or name in _ALIGNED_SCALARS)]
    source = ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs,
                       attrs={(i,): [["tt.divisibility", ALIGNED]] for i in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return Compiled(kernel=label, arch=arch, config=dict(config.kwargs), num_warps=config.num_warps,
                    num_stages=config.num_stages, shared_bytes=compiled.metadata.shared,
                    registers=usage.get("REG", 0), spill_bytes=usage.get("STACK", 0) + usage.get("LOCAL", 0),
                    tensor_core_instructions=len(re.findall(rf"\b{TENSOR_CORE_INSTRUCTION[arch]}\b", ptx))
                    if tensor_cores else -1)


def compile_all(arch: int) -> list[Compiled]:
    if configs.INTERPRETING:
        raise RuntimeError("compile_check needs compiled kernels: unset TRITON_INTERPRET")
    return [compile_kernel(arch, *variant) for variant in _variants(arch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args()
    results = [r for arch in args.arch for r in compile_all(arch)]
    if args.json:
        print(json.dumps([dict(asdict(r), problems=r.problems()) for r in results]))
        return
    print(f"triton {triton.__version__}, all features on")
    print(f"{'kernel':22} {'sm':>3} {'config':38} {'warps':>5} {'stages':>6} {'regs':>5} {'shared KiB':>10} "
          f"{'spill B':>7} {'tc instr':>8}  problems")
    for r in results:
        tiles = "x".join(str(v) for v in r.config.values()) or "-"
        print(f"{r.kernel:22} {r.arch:>3} {tiles:38} {r.num_warps:>5} {r.num_stages:>6} {r.registers:>5} "
              f"{r.shared_bytes / 1024:>10.1f} {r.spill_bytes:>7} {r.tensor_core_instructions:>8}  "
              f"{'; '.join(r.problems()) or 'ok'}")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "osft-kernels-triton-cache"))
    main()
