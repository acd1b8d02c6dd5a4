"""Tile configurations of the Triton kernels, and the fused forward's dot precision.

There is no autotuning: one config per architecture, so a row's statistics are computed by the same
tiles in the same order in every process and for every batch (bitwise reproducible and
batch-invariant). Each config was checked ahead of time by ``python tools/triton_compile_check.py``,
which compiles the launches the backend runs (:mod:`.launches`) for each architecture: tensor-core
instructions, within shared memory, no spills. Under ``TRITON_INTERPRET=1`` a
small-tile config is used (the interpreter's cost is per operation, and small tiles exercise the
multi-tile paths on small test shapes).
"""
import os
from dataclasses import dataclass

import torch
import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Vocabulary columns per forward chunk (one program per row tile and chunk). Fixed, so the number of
# partials per row, and the order in which they are merged, never changes.
CHUNK_COLUMNS = 128 if INTERPRETING else 4096


@dataclass(frozen=True)
class EpilogueConfig:
    """Rows per program, columns per step and warps of an epilogue kernel (memory-bound: one for all
    architectures)."""

    rows: int
    tile: int
    warps: int


# the fastest of 8 candidates each on an H200 with float32 chunks of 16384 x 16384 and 2080 x 128256
# (benchmarks/gpu_checks.py --steps stages): 0.40 and 0.89 ms per 2080 x 128256 chunk, where reading
# it once at the measured copy bandwidth takes 0.25 ms
STATS_EPILOGUE = EpilogueConfig(rows=2, tile=1024, warps=4)
GRAD_EPILOGUE = EpilogueConfig(rows=8, tile=512, warps=8)
# with the sum of squared probabilities (metrics, no gradient) the statistics kernel spills 8 bytes on
# sm_80/89 with 4 warps; 8 warps do not (compile check), not measured on a GPU
SQUARE_STATS_EPILOGUE = EpilogueConfig(rows=2, tile=1024, warps=8)


def _forward(block_n, block_v, block_d, warps, stages):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d,
                          "CHUNK_TILES": CHUNK_COLUMNS // block_v}, num_warps=warps, num_stages=stages)


# architecture -> operand kind -> config. sm_89 and sm_120 have 99 KiB of shared memory per block,
# sm_80 163 KiB, sm_90 and sm_100 227 KiB. float32 operands (3xTF32) need more registers.
FORWARD_CONFIGS = {
    80: {"half": _forward(128, 64, 64, 8, 3), "float32": _forward(128, 64, 32, 8, 3)},
    89: {"half": _forward(128, 64, 64, 8, 3), "float32": _forward(128, 64, 32, 8, 3)},
    90: {"half": _forward(64, 128, 64, 8, 3), "float32": _forward(128, 64, 32, 8, 3)},
    100: {"half": _forward(128, 64, 64, 8, 3), "float32": _forward(128, 128, 32, 8, 3)},
    120: {"half": _forward(128, 64, 64, 8, 3), "float32": _forward(64, 64, 32, 8, 3)},
}
INTERPRETER_FORWARD = _forward(16, 64, 32, 4, 1)


def arch_of(capability: tuple[int, int]) -> int:
    """The config family of a compute capability: the largest listed architecture of the same
    generation that is not newer (8.6 -> 80, 8.9 -> 89, 9.0 -> 90, 10.x/11.x -> 100, 12.x -> 120)."""
    major, minor = capability
    if major < 8:
        raise RuntimeError(f"the triton backend needs compute capability 8.0 or newer, got {major}.{minor}")
    if major == 8:
        return 89 if minor >= 9 else 80
    return {9: 90, 10: 100, 11: 100}.get(major, 120)


def device_arch(device: torch.device) -> int:
    return arch_of(torch.cuda.get_device_capability(device))


def operand_kind(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "half"


def forward_config(device: torch.device, dtype: torch.dtype) -> triton.Config:
    return INTERPRETER_FORWARD if INTERPRETING else FORWARD_CONFIGS[device_arch(device)][operand_kind(dtype)]


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: half precision as is; float32 as 3xTF32 under torch's default "highest"
    float32 matmul precision and TF32 under "high"/"medium" (never CUDA-core FMAs). The interpreter
    computes in float32 ("ieee")."""
    if INTERPRETING or dtype != torch.float32:
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
