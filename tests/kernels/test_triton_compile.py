"""Ahead-of-time compilation of every kernel for sm_80 (A100), sm_89 (L40, RTX 4090), sm_90 (H100/H200),
sm_100 (B200) and sm_120 (RTX 5090), without a GPU: the fused forward uses tensor-core instructions,
every kernel fits the architecture's shared memory and nothing spills. Runs
``tools/triton_compile_check.py`` in a subprocess because the kernels of this test session are
decorated for the interpreter."""
import json
import os
import subprocess
import sys

import pytest
from helpers.paths import ROOT

pytest.importorskip("triton")
pytestmark = pytest.mark.slow
TOOL = ROOT / "tools" / "triton_compile_check.py"
ARCHITECTURES = (80, 89, 90, 100, 120)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(TOOL), "--json"],
                            env=env, check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_kernel_compiles_fit_for_its_architecture(compiled, arch):
    assert {r["arch"] for r in compiled} == set(ARCHITECTURES)
    results = {r["kernel"]: r for r in compiled if r["arch"] == arch}
    assert set(results) == {"row_partials[bf16]", "row_partials[fp32]", "merge_partials", "block_stats",
                            "block_stats[square]", "logit_grad[bf16]"}
    for r in results.values():
        assert not r["problems"], (r["kernel"], r["config"], r["problems"])
        assert r["registers"] > 0 and r["shared_bytes"] >= 0
    assert results["row_partials[bf16]"]["tensor_core_instructions"] > 0
    assert results["row_partials[fp32]"]["tensor_core_instructions"] > 0
