"""A drop-in for verl's fused logprobs/entropy kernel, ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``
(verl 0.9.1), backed by :func:`osft_kernels.linear_logprobs`.

verl calls that function from the forward it installs with ``use_fused_kernels=True`` and
``fused_kernel_options.impl_backend=triton`` (FSDP and the other Hugging Face engines) and from its Megatron
fused forward. :func:`patch_verl` makes those call sites use :func:`linear_cross_entropy` instead; importing
:mod:`osft_kernels.integrations.verl_patch` (verl's ``actor_rollout_ref.model.external_lib``) runs it.
"""
import importlib
import sys
from numbers import Real

import torch
from torch import Tensor

from .. import checks
from ..api import linear_logprobs

VERL_KERNEL_MODULE = "verl.utils.kernel.linear_cross_entropy"
REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None, *, backend: str = "auto",
                         memory_budget: int | None = None) -> tuple[Tensor, Tensor]:
    """``(logprobs, entropy)`` of ``softmax(hidden @ weight.T / temperature)``, with verl's arguments.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16 (verl: ``[1, nnz, D]`` packed tokens; Megatron
            ``[S, 1, D]``).
        weight: ``[V, D]``, hidden's dtype (the output layer's weight).
        labels: integer tensor with one entry per row of ``hidden`` (any shape), values in ``[0, V)``;
            verl passes the input ids rolled by one, so every position holds a real token and there is
            no ignore index.
        temperature: float > 0.
        reduction: ``"none"``: ``logprobs`` per token; ``"sum"`` / ``"mean"``: their sum / mean over
            all tokens, a 0-d tensor. ``entropy`` is per token in every case.
        dist_process_group: None, or a process group of one rank. Vocabulary-parallel output layers
            (a group of several ranks, each holding a slice of ``weight``) are not supported yet.
        backend, memory_budget: as in :func:`osft_kernels.linear_logprobs`.

    Returns float32 (float64 for float64 inputs) ``logprobs`` and ``entropy`` shaped like ``labels``
    (verl's Triton kernel returns the same values flattened to ``[N]``), both differentiable in
    ``hidden`` and ``weight``.
    """
    _check_process_group(dist_process_group)
    if not isinstance(temperature, Real) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a float (verl's fused path takes one temperature per batch), "
                        f"got {temperature!r}")
    checks.check_positive_number("temperature", temperature)
    if not isinstance(reduction, str) or reduction.lower() not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    checks.check_head(hidden, weight, None)
    flat_labels = _check_labels(labels, hidden, weight.shape[0])
    out = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, flat_labels, temperature=float(temperature),
                          ignore_index=-1, return_entropy=True, backend=backend, memory_budget=memory_budget)
    logprobs, entropy = out.logprobs.view(labels.shape), out.entropy.view(labels.shape)
    reduction = reduction.lower()
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


def _check_process_group(group) -> None:
    if group is None:
        return
    size = group.size() if isinstance(group, getattr(torch.distributed, "ProcessGroup", ())) else None
    if size == 1:
        return
    got = f"a process group of {size} ranks" if size is not None else f"{type(group).__name__}"
    raise NotImplementedError(
        f"dist_process_group must be None or a process group of one rank: a vocabulary-parallel output layer "
        f"(weight split over the ranks of the group) is not supported yet; got {got}")


def _check_labels(labels, hidden: Tensor, vocab_size: int) -> Tensor:
    """``labels`` flattened to ``[N]`` int64, ``N = hidden.numel() // D``, every value in ``[0, V)``."""
    checks.require_tensor("labels", labels)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor (token ids), got {labels.dtype}")
    rows = hidden.shape[:-1].numel()
    if labels.numel() != rows:
        raise ValueError(f"labels must hold one token id per row of hidden ({rows} for hidden of shape "
                         f"{tuple(hidden.shape)}), got shape {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    flat = labels.reshape(-1).long()
    bad = (flat < 0) | (flat >= vocab_size)
    if bool(bad.any()):
        position = int(bad.nonzero()[0])
        raise ValueError(f"labels must be token ids in [0, V) = [0, {vocab_size}) (verl's fused path has no "
                         f"ignore index); found {int(flat[position])} at flat position {position}")
    return flat


def patch_verl() -> list[str]:
    """Makes verl's fused forwards call :func:`linear_cross_entropy`.

    Rebinds ``linear_cross_entropy`` in verl's kernel module (the Hugging Face forwards import it from
    there at each call) and in every loaded ``verl.*`` module that already imported it (the Megatron
    forwards import it once, at load). Needs verl installed; calling it again is harmless. Returns the
    names of the modules it changed.
    """
    original = importlib.import_module(VERL_KERNEL_MODULE).linear_cross_entropy
    if original is linear_cross_entropy:
        return []
    patched = []
    for name, module in list(sys.modules.items()):
        if (name == "verl" or name.startswith("verl.")) and getattr(module, "linear_cross_entropy", None) is original:
            module.linear_cross_entropy = linear_cross_entropy
            patched.append(name)
    return patched
