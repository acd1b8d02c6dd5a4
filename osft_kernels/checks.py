"""Checks of the public arguments of the ops: each names the argument and what was expected."""
import math
import operator
import warnings
from numbers import Integral, Real

import torch
from torch import Tensor

from .backend import BackendOptions

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
REDUCTIONS = ("none", "sum", "mean")


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A real, finite number (``bool`` excluded)."""
    return _is_number(value) and math.isfinite(value)


def require_tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_head(hidden, weight, bias) -> None:
    """``hidden [..., D]``, ``weight [V, D]`` and ``bias [V] | None``, one float dtype, one device."""
    hidden = require_tensor("hidden", hidden)
    weight = require_tensor("weight", weight)
    if hidden.is_meta:
        raise NotImplementedError("hidden is a meta tensor: these ops read the target values to drop ignored "
                                  "tokens, so they need tensors with data")
    if hidden.dtype not in INPUT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D] with at least one dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        bias = require_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the dtype of weight ({weight.dtype}), got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def check_ignore_index(ignore_index) -> None:
    if not isinstance(ignore_index, Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 ([{INT64_MIN}, {INT64_MAX}]), got {ignore_index}")


def check_targets(targets, hidden: Tensor, vocab_size: int, ignore_index) -> Tensor:
    """Integer ``targets`` shaped like ``hidden.shape[:-1]`` with values in ``[0, V)`` or ``ignore_index``.

    Returns them as int64 (the same tensor when they are int64): every comparison happens there, so
    narrow integer types cannot wrap around ``ignore_index`` or ``V``.
    """
    targets = require_tensor("targets", targets)
    check_ignore_index(ignore_index)
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor (e.g. torch.long), got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    targets = targets.long()
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"targets must be in [0, V) = [0, {vocab_size}) or equal ignore_index "
                         f"({ignore_index}); found {int(targets[position])} at position {position}")
    return targets


def check_positive_number(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not is_finite_number(value) or value <= 0:
        expected = "None or a finite number > 0" if allow_none else "a finite number > 0"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_in_compute_dtype(name: str, value, dtype: torch.dtype) -> None:
    """A checked positive number (or tensor of them) must stay a normal, finite number in ``dtype``:
    ``1e-300`` is 0 in float32 and ``1e300`` is inf."""
    info = torch.finfo(dtype)
    if isinstance(value, Tensor):
        value = value.to(dtype)
        representable = bool(((value >= info.tiny) & (value <= info.max)).all())
    else:
        representable = info.tiny <= value <= info.max
    if not representable:
        got = "" if isinstance(value, Tensor) else f", got {value!r}"
        raise ValueError(f"{name} must be between {info.tiny:.3g} and {info.max:.3g} (the normal numbers of the "
                         f"compute dtype {dtype}){got}")


def check_label_smoothing(value) -> None:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {value!r}")


def check_z_loss(value) -> None:
    if not _is_number(value) or not 0.0 <= value < math.inf:
        raise ValueError(f"z_loss must be a finite float >= 0, got {value!r}")


def check_temperature(temperature, targets: Tensor, dtype: torch.dtype) -> None:
    """A finite float > 0, or a tensor broadcastable to ``targets.shape`` with finite values > 0, each a
    normal number in the compute ``dtype``."""
    if not isinstance(temperature, Tensor):
        check_positive_number("temperature", temperature)
        check_in_compute_dtype("temperature", temperature, dtype)
        return
    if not temperature.is_floating_point():
        raise TypeError(f"temperature tensor must be floating point, got {temperature.dtype}")
    if temperature.device != targets.device:
        raise ValueError(f"temperature is on {temperature.device} but hidden is on {targets.device}")
    try:
        shape = torch.broadcast_shapes(temperature.shape, targets.shape)
    except RuntimeError:
        shape = None
    if shape != targets.shape:
        raise ValueError(f"temperature tensor must be broadcastable to targets.shape = {tuple(targets.shape)}, "
                         f"got {tuple(temperature.shape)}")
    if not bool(((temperature > 0) & torch.isfinite(temperature)).all()):
        raise ValueError("temperature tensor must contain only finite values > 0")
    check_in_compute_dtype("temperature tensor", temperature, dtype)


def check_token_weights(token_weights, shape: torch.Size, shift: bool, device: torch.device, *,
                        values: bool = True) -> None:
    """Per-target loss weights: a floating tensor of the per-token outputs' ``shape`` (that of the
    targets, shifted when ``shift``) on ``device``, finite (read back only with ``values``)."""
    if token_weights is None:
        return
    token_weights = require_tensor("token_weights", token_weights)
    if not token_weights.is_floating_point():
        raise TypeError(f"token_weights must be a floating point tensor, got {token_weights.dtype}")
    if token_weights.shape != shape:
        where = "targets[..., 1:] with shift=True" if shift else "targets"
        raise ValueError(f"token_weights must have the shape of the per-token outputs {tuple(shape)} ({where}), "
                         f"got {tuple(token_weights.shape)}")
    if token_weights.device != device:
        raise ValueError(f"token_weights is on {token_weights.device} but hidden is on {device}")
    if values and not bool(torch.isfinite(token_weights).all()):
        raise ValueError("token_weights must be finite")


def renamed_weights(weights, token_weights, targets, shift, *, stacklevel: int) -> Tensor | None:
    """``token_weights``, or the deprecated ``weights`` (shaped like ``targets``, shifted here) with a
    :class:`DeprecationWarning` at ``stacklevel`` counted from the caller, as :func:`warnings.warn` counts it."""
    if weights is None:
        return token_weights
    if token_weights is not None:
        raise TypeError("pass token_weights only: weights is its deprecated alias")
    warnings.warn("weights= is deprecated: pass token_weights=, shaped like the per-token outputs "
                  "(targets[..., 1:] with shift=True)", DeprecationWarning, stacklevel=stacklevel + 1)
    weights = require_tensor("weights", weights)
    targets = require_tensor("targets", targets)
    if weights.shape != targets.shape:
        raise ValueError(f"weights (deprecated) must have the shape of targets {tuple(targets.shape)}, "
                         f"got {tuple(weights.shape)}")
    return weights[..., 1:] if shift and weights.dim() else weights


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_outputs(outputs, known: tuple[str, ...]) -> frozenset:
    """A tuple or list of names among ``known``, returned as a set."""
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs must be a tuple of names among {known}, got {outputs!r}")
    unknown = [name for name in outputs if name not in known]
    if unknown:
        raise ValueError(f"outputs must name only {known}, got {unknown}")
    return frozenset(outputs)


def backend_options(memory_budget) -> BackendOptions:
    """``memory_budget``: None, or any integer >= 0 (``numpy.int64`` included), kept as an ``int``."""
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, Integral)
                                      or memory_budget < 0):
        raise ValueError(f"memory_budget must be None or an int >= 0 (bytes), got {memory_budget!r}")
    return BackendOptions(None if memory_budget is None else operator.index(memory_budget))
