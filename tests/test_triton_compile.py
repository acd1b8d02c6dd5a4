"""Ahead-of-time compilation of every kernel and autotuning config for sm_90 (H100/H200) and sm_80
(A100), without a GPU: tensor-core instructions present, shared memory within the device limit, no
register spills. Runs ``osft_kernels.triton_kernels.compile_check`` in a subprocess because the
kernels of this test session are decorated for the interpreter."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from osft_kernels.triton_kernels import configs


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "osft_kernels.triton_kernels.compile_check", "--json"],
                            env=env, check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", [90, 80])
def test_every_config_compiles_fit_for_its_architecture(compiled, arch):
    results = [r for r in compiled if r["arch"] == arch]
    for r in results:
        assert not r["problems"], (r["kernel"], r["config"], r["problems"])
        assert r["registers"] > 0 and r["shared_bytes"] >= 0
    tuned = {name: [r for r in results if r["kernel"] == name] for name in ("row_partials", "logit_grad[fused]")}
    assert len(tuned["row_partials"]) == len(configs.FORWARD_CONFIGS[arch])
    assert len(tuned["logit_grad[fused]"]) == len(configs.BACKWARD_CONFIGS[arch])
    assert {r["kernel"] for r in results} >= {"logit_grad[own_rows]", "logit_grad[own_cols]", "merge_partials"}
