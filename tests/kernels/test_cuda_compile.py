"""Ahead-of-time compilation of the CUDA epilogue (``tools/cuda_compile_check.py``) for sm_80 (A100),
sm_89 (L40, RTX 4090), sm_90a (H100/H200), sm_100a (B200) and sm_120 (RTX 5090), without a GPU: every
kernel variant compiles, nothing spills, and the register count leaves room for four CTAs of 256
threads per SM. Needs nvcc (CI machines have it), not torch's CUDA build."""
import json
import shutil
import subprocess
import sys

import pytest
from helpers.paths import ROOT

TOOL = ROOT / "tools" / "cuda_compile_check.py"
ARCHITECTURES = ("sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120")
KERNELS = {"block_stats_kernel<true>", "block_stats_kernel<false>",
           *(f"logit_grad_kernel<{grad}, {vec}>" for grad in ("float", "__half", "__nv_bfloat16")
             for vec in ("true", "false"))}
MAX_REGISTERS = 64  # 65536 registers per SM / (4 CTAs x 256 threads)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA compiler) is not on PATH")]


@pytest.fixture(scope="module")
def report():
    result = subprocess.run([sys.executable, str(TOOL), "--json"], check=False, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_kernel_compiles_without_spills(report, arch):
    kernels = {k["kernel"]: k for k in report["kernels"] if k["arch"] == arch}
    assert set(kernels) == KERNELS
    for k in kernels.values():
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k["stack_bytes"] == 0, k
        assert 0 < k["registers"] <= MAX_REGISTERS, k
    assert not report["problems"]
