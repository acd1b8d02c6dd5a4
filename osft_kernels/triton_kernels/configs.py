"""Tile configurations per GPU generation, and the autotuned launchers built from them.

Autotuning is keyed on ``D`` and ``V`` (and, by Triton, on the argument dtypes) and never on the
number of tokens, so every batch of a run uses the same tiles for the same head, which keeps the
forward batch-invariant. ``deterministic=True`` bypasses autotuning and launches fixed configs (the
first forward config of the device's list, and ``DETERMINISTIC_BACKWARD_CONFIG``), so repeated runs
and processes use identical tiles.

The lists were checked ahead of time by ``osft_kernels.triton_kernels.compile_check``: each config
compiles for its architecture with tensor-core instructions, fits in shared memory, and does not spill.
Under ``TRITON_INTERPRET=1`` a single small-tile config is used (the interpreter's cost is per
operation, and small tiles exercise the multi-tile paths on small test shapes).
"""
import os

import torch
import triton

from .backward import logit_grad_kernel
from .forward import row_partials_kernel

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


# Vocabulary columns per forward chunk (one program per row tile and chunk). Fixed, so the number of
# partials per row, and the order in which they are merged, is the same for every config.
CHUNK_COLUMNS = 128 if INTERPRETING else 4096


def _forward(block_n, block_v, block_d, warps, stages):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d,
                          "CHUNK_TILES": CHUNK_COLUMNS // block_v}, num_warps=warps, num_stages=stages)


def _backward(block_n, block_v, block_d, warps, stages):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d},
                         num_warps=warps, num_stages=stages)


# architecture (sm_90: Hopper and newer, sm_80: Ampere/Ada) -> autotuning configs, the default first.
# All compile without register spills for bfloat16 with every feature on (compile_check).
FORWARD_CONFIGS = {
    90: [_forward(128, 128, 64, 8, 3), _forward(128, 128, 64, 8, 4), _forward(64, 256, 64, 8, 3),
         _forward(128, 64, 64, 8, 3)],
    80: [_forward(128, 64, 64, 8, 3), _forward(64, 128, 64, 8, 3), _forward(128, 64, 32, 8, 4),
         _forward(64, 64, 64, 8, 4)],
}
BACKWARD_CONFIGS = {
    90: [_backward(128, 64, 64, 8, 3), _backward(64, 128, 64, 8, 2), _backward(128, 64, 32, 8, 3),
         _backward(64, 64, 64, 8, 3)],
    80: [_backward(64, 128, 32, 8, 3), _backward(128, 64, 32, 8, 3), _backward(64, 64, 64, 8, 3),
         _backward(64, 64, 32, 8, 3)],
}
# the deterministic backward's two launches (each program walks a whole row or column of tiles)
DETERMINISTIC_BACKWARD_CONFIG = {90: _backward(64, 64, 64, 8, 3), 80: _backward(64, 64, 64, 8, 3)}
INTERPRETER_FORWARD = _forward(16, 64, 32, 4, 1)
INTERPRETER_BACKWARD = _backward(16, 64, 32, 4, 1)


def device_arch(device: torch.device) -> int:
    """The config family of a CUDA device: 90 for Hopper and newer, 80 for Ampere/Ada."""
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        raise RuntimeError(f"the triton backend needs compute capability 8.0 or newer, got {major}.x")
    return 90 if major >= 9 else 80


def _for_device(family):
    def prune(configs, named_args, **kwargs):
        allowed = family[device_arch(named_args["hidden_ptr"].device)]
        return [c for c in configs if any(c is a for a in allowed)]
    return prune


def _autotuned(kernel, family, interpreter_config, reset_to_zero=None):
    if INTERPRETING:
        return triton.autotune([interpreter_config], key=["D", "V"], reset_to_zero=reset_to_zero)(kernel)
    configs = [c for configs in family.values() for c in configs]
    return triton.autotune(configs, key=["D", "V"], reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": _for_device(family)})(kernel)


row_partials_autotuned = _autotuned(row_partials_kernel, FORWARD_CONFIGS, INTERPRETER_FORWARD)
logit_grad_autotuned = _autotuned(logit_grad_kernel, BACKWARD_CONFIGS, INTERPRETER_BACKWARD,
                                  reset_to_zero=["d_hidden_ptr", "d_weight_ptr", "d_bias_ptr"])


def fixed_forward_config(device: torch.device) -> triton.Config:
    return INTERPRETER_FORWARD if INTERPRETING else FORWARD_CONFIGS[device_arch(device)][0]


def fixed_backward_config(device: torch.device) -> triton.Config:
    return INTERPRETER_BACKWARD if INTERPRETING else DETERMINISTIC_BACKWARD_CONFIG[device_arch(device)]


def launch(kernel, autotuned, grid, args, constants, *, config: triton.Config | None) -> None:
    """Run ``kernel`` over ``grid`` (a function of the config's meta-parameters) with ``config``, or
    autotuned when ``config`` is None."""
    if config is None:
        autotuned[grid](*args, **constants)
        return
    kernel[grid](*args, **constants, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
