"""Ahead-of-time compilation of every Triton kernel for a GPU architecture, on any machine.

``python tools/triton_compile_check.py [--arch 80 89 90 100 120] [--json]`` builds each kernel's launch
with :mod:`osft_kernels.triton_kernels.launches` (what the backend runs), every feature switched on
(the largest variant; bfloat16 operands, and float32 operands with 3xTF32 for the fused forward),
on meta tensors, compiles it and reports what the compiler produced: tensor-core instructions in the
fused forward's PTX (``mma.sync`` on sm_80/89/120, ``wgmma`` on sm_90, ``tcgen05.mma`` on sm_100),
shared memory against the architecture's per-block limit, and registers and spills from
``cuobjdump --dump-resource-usage`` on the cubin: ptxas places spilled registers in the stack frame,
so ``STACK`` (plus ``LOCAL``) above zero means the kernel spills. No GPU is needed, but the kernels
must not be interpreted: run it without ``TRITON_INTERPRET=1``.
"""
import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from osft_kernels.driver import NUM_PARTIALS, VOCAB_BLOCK
from osft_kernels.row_stats import NUM_STATS
from osft_kernels.triton_kernels import configs, launches

ARCHITECTURES = (80, 89, 90, 100, 120)
# bytes of shared memory one block may use: A100, L40/RTX 4090, H100/H200, B200, RTX 5090
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
TENSOR_CORE_INSTRUCTION = {80: r"mma\.sync", 89: r"mma\.sync", 90: r"wgmma", 100: r"tcgen05\.mma",
                           120: r"mma\.sync"}
ALIGNED = 16  # pointers, D and the row strides are assumed 16-aligned, as Triton specializes them at run time
_ALIGNED_SCALARS = ("D", "stride_hn", "stride_wv", "stride_l", "stride_dz", "stride_p")
# the shapes of the meta tensors the launches are built from (they only set strides and grids)
ROWS, DIM, VOCAB = 4096, 4096, 128256


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


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _variants(arch: int):
    """(label, launch, has tensor cores) of every kernel to compile, all features on."""
    features = dict(entropy=True, mean=True, square=True)
    targets, inv_temp, stats = _meta(ROWS, dtype=torch.int64), _meta(ROWS), _meta(ROWS, NUM_STATS)
    partials = _meta(VOCAB // configs.CHUNK_COLUMNS * NUM_PARTIALS * ROWS)
    for label, dtype, kind, precision in (("row_partials[bf16]", torch.bfloat16, "half", "ieee"),
                                          ("row_partials[fp32]", torch.float32, "float32", "tf32x3")):
        yield label, launches.row_partials(
            _meta(ROWS, DIM, dtype=dtype), _meta(VOCAB, DIM, dtype=dtype), _meta(VOCAB, dtype=dtype), targets,
            inv_temp, stats, partials, 30.0, **features, config=configs.FORWARD_CONFIGS[arch][kind],
            input_precision=precision), True
    yield "merge_partials", launches.merge_partials(partials, stats, VOCAB, **features), False
    width = 16 * VOCAB_BLOCK
    logits, bias = _meta(ROWS, width), _meta(VOCAB)
    block_partials = _meta(ROWS, width // VOCAB_BLOCK, NUM_PARTIALS)
    for label, square in (("block_stats", False), ("block_stats[square]", True)):
        yield label, launches.block_stats(logits, block_partials, _meta(ROWS), targets, inv_temp, bias, 30.0, 0,
                                          entropy=True, mean=True, square=square), False
    dz = logits.view(torch.bfloat16)[:, :width]
    yield "logit_grad[bf16]", launches.logit_grad(logits, dz, targets, inv_temp, stats, _meta(ROWS, NUM_STATS), bias,
                                                  30.0, 0, VOCAB, entropy=True, mean=True), False


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", text)}


def compile_kernel(arch: int, label: str, launch: launches.Launch, tensor_cores: bool) -> Compiled:
    signature = dict(launch.signature(), **{name: "constexpr" for name in launch.constexprs})
    aligned = [i for i, name in enumerate(launch.kernel.arg_names)
               if name in signature and (signature[name].startswith("*") or name in _ALIGNED_SCALARS)]
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=launch.constexprs,
                       attrs={(i,): [["tt.divisibility", ALIGNED]] for i in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    tiles = {name: value for name, value in launch.constexprs.items() if name.startswith(("BLOCK", "TILE", "ROWS",
                                                                                            "CHUNK"))}
    return Compiled(kernel=label, arch=arch, config=tiles, num_warps=launch.num_warps,
                    num_stages=launch.num_stages, shared_bytes=compiled.metadata.shared,
                    registers=usage.get("REG", 0), spill_bytes=usage.get("STACK", 0) + usage.get("LOCAL", 0),
                    tensor_core_instructions=len(re.findall(rf"\b{TENSOR_CORE_INSTRUCTION[arch]}\b", ptx))
                    if tensor_cores else -1)


def compile_all(arch: int) -> list[Compiled]:
    if configs.INTERPRETING:
        raise RuntimeError("the compile check needs compiled kernels: unset TRITON_INTERPRET")
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
