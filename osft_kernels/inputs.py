"""Checks of the public arguments, and the flattening of a batch into the token rows that are computed.

Ignored tokens (``target == ignore_index``) are dropped before any backend runs: no FLOPs are spent
on them, their outputs are 0 and they receive no gradient.
"""
import math
import operator
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
REDUCTIONS = ("none", "sum", "mean")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of logits, statistics and gradient accumulation: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def target_mask(targets: Tensor, ignore_index: int, shift: bool) -> Tensor:
    """Bool mask of the (shifted) targets that carry loss: ``targets[..., 1:]`` when ``shift``; compared
    as int64, like :func:`check_targets`, so a narrow integer type cannot wrap around ``ignore_index``."""
    require_tensor("targets", targets)
    if shift:
        if targets.dim() == 0:
            raise ValueError("shift=True needs targets with at least one dimension to shift along")
        targets = targets[..., 1:]
    return targets.long() != ignore_index


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


def fold_logit_scale(logit_scale, temperature, softcap) -> tuple:
    """``(temperature, softcap)`` that apply a constant logit multiplier ``a`` (Cohere's ``logit_scale``,
    Granite's ``1 / logits_scaling``) before the softcap: ``c tanh(a s / c) / T = (c/a) tanh(s / (c/a)) / (T/a)``,
    so ``softcap / a`` and ``temperature / a`` (also ``s * a / T = s / (T/a)`` without a softcap)."""
    check_positive_number("logit_scale", logit_scale)
    if logit_scale == 1:
        return temperature, softcap
    if isinstance(temperature, Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"temperature tensor must be floating point, got {temperature.dtype}")
        temperature = temperature / logit_scale
    else:
        check_positive_number("temperature", temperature)
        temperature = temperature / logit_scale
    if softcap is not None:
        check_positive_number("softcap", softcap, allow_none=True)
        softcap = softcap / logit_scale
    return temperature, softcap


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


def check_weights(weights, targets: Tensor) -> None:
    """Per-token loss weights: a finite floating tensor with ``targets.shape``."""
    if weights is None:
        return
    weights = require_tensor("weights", weights)
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating point tensor, got {weights.dtype}")
    if weights.shape != targets.shape:
        raise ValueError(f"weights must have the shape of targets {tuple(targets.shape)}, got {tuple(weights.shape)}")
    if weights.device != targets.device:
        raise ValueError(f"weights is on {weights.device} but hidden is on {targets.device}")
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be finite")


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


def wants_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will differentiate through any of ``tensors`` (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@dataclass(frozen=True)
class BackendOptions:
    """Backend keywords: ``memory_budget``, bytes of logits chunk buffers of the chunked backends (None:
    their default; 0: none, which only the triton backend's fused forward can do, without gradients)."""

    memory_budget: int | None = None


def backend_options(memory_budget) -> BackendOptions:
    """``memory_budget``: None, or any integer >= 0 (``numpy.int64`` included), kept as an ``int``."""
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, Integral)
                                      or memory_budget < 0):
        raise ValueError(f"memory_budget must be None or an int >= 0 (bytes), got {memory_budget!r}")
    return BackendOptions(None if memory_budget is None else operator.index(memory_budget))


HIDDEN_GRAD_SLICE = 8192  # rows of hidden's gradient converted and placed at a time


@dataclass
class TokenRows:
    """The tokens of a batch that are not ignored, flattened to rows.

    ``hidden [N, D]`` is the caller's ``hidden`` flattened (a view where its strides allow, still on
    the autograd graph); the ``n`` computed rows are ``hidden[hidden_index]`` (``hidden_index [n]``
    int64, distinct rows; None: all ``N`` rows in order). No copy of them is made for the whole
    batch: backends gather them a chunk at a time (:meth:`hidden_rows`).
    ``targets [n]`` int64, ``temperature`` a float or a detached ``[n]`` tensor, ``weights`` a detached
    ``[n]`` tensor or None; all tensors but ``hidden`` are in the compute dtype.
    ``out_index [n]`` holds each row's position in the flattened output (None: rows are the output, in order).
    """

    hidden: Tensor
    targets: Tensor
    temperature: float | Tensor
    weights: Tensor | None
    out_shape: torch.Size
    out_index: Tensor | None
    hidden_index: Tensor | None = None

    @property
    def num_rows(self) -> int:
        """``n``, the number of computed rows."""
        return self.targets.shape[0]

    def hidden_rows(self, r0: int = 0, r1: int | None = None) -> Tensor:
        """The computed rows ``r0:r1`` of ``hidden``, ``[r1 - r0, D]`` (a gathered copy when rows are
        skipped; differentiable)."""
        r1 = self.num_rows if r1 is None else r1
        if self.hidden_index is None:
            return self.hidden[r0:r1]
        return self.hidden.index_select(0, self.hidden_index[r0:r1])

    def hidden_grad(self, d_rows: Tensor) -> Tensor:
        """:func:`hidden_grad` of ``d_rows [n, D]`` for this batch's ``hidden``."""
        return hidden_grad(d_rows, self.hidden_index, self.hidden.shape, self.hidden.dtype)

    def scatter(self, values: Tensor) -> Tensor:
        """Per-row ``[n, ...]`` values to ``[*out_shape, ...]``, 0 at ignored positions (differentiable)."""
        shape = (*self.out_shape, *values.shape[1:])
        if self.out_index is None:
            return values.reshape(shape)
        out = values.new_zeros(self.out_shape.numel(), *values.shape[1:]).index_copy(0, self.out_index, values)
        return out.view(shape)

    def gather(self, grid: Tensor) -> Tensor:
        """The rows ``[n, ...]`` of per-position values ``[*out_shape, ...]``: the inverse of :meth:`scatter`."""
        flat = grid.reshape(self.out_shape.numel(), *grid.shape[len(self.out_shape):])
        return flat if self.out_index is None else flat[self.out_index]


def hidden_grad(d_rows: Tensor, hidden_index: Tensor | None, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A gradient ``[n, D]`` of the computed rows (:class:`TokenRows`) as the gradient ``shape = [N, D]`` of
    ``hidden`` in ``dtype``, 0 at rows not computed (``d_rows`` itself when nothing changes). Converted
    and placed ``HIDDEN_GRAD_SLICE`` rows at a time, so no second full-size temporary exists."""
    if hidden_index is None:
        return d_rows.to(dtype)
    d_hidden = d_rows.new_zeros(shape, dtype=dtype)
    for start in range(0, hidden_index.shape[0], HIDDEN_GRAD_SLICE):
        rows = slice(start, start + HIDDEN_GRAD_SLICE)
        d_hidden.index_copy_(0, hidden_index[rows], d_rows[rows].to(dtype))
    return d_hidden


def token_rows(hidden: Tensor, targets: Tensor, *, temperature, weights, ignore_index: int,
               shift: bool) -> TokenRows:
    """Flatten a checked batch; with ``shift`` position t is paired with target t+1 (last position dropped).

    Per-token tensors that describe the target (``weights``) shift with ``targets``; temperature
    describes the logits and stays with the position that produces them.
    """
    dtype = compute_dtype(hidden.dtype)
    positions = None
    if isinstance(temperature, Tensor):
        temperature = temperature.detach().to(dtype).expand(targets.shape)
    if weights is not None:
        weights = weights.detach().to(dtype)
    if shift:
        if targets.dim() == 0:
            raise ValueError("shift=True needs targets with at least one dimension to shift along")
        positions = torch.arange(targets.numel(), device=targets.device).view(targets.shape)[..., :-1]
        targets = targets[..., 1:]
        weights = None if weights is None else weights[..., 1:]
        if isinstance(temperature, Tensor):
            temperature = temperature[..., :-1]

    flat_targets = targets.reshape(-1)
    keep = target_mask(flat_targets, ignore_index, shift=False)
    out_index = source_rows = None
    if shift or not bool(keep.all()):
        out_index = keep.nonzero().squeeze(1)
        source_rows = out_index if positions is None else positions.reshape(-1)[out_index]

    def rows_of(values: Tensor) -> Tensor:
        values = values.reshape(-1)
        return values.contiguous() if out_index is None else values[out_index]

    return TokenRows(
        hidden=hidden.reshape(-1, hidden.shape[-1]),
        targets=rows_of(flat_targets).long(),
        temperature=rows_of(temperature) if isinstance(temperature, Tensor) else float(temperature),
        weights=None if weights is None else rows_of(weights),
        out_shape=targets.shape,
        out_index=out_index,
        hidden_index=source_rows,
    )


def prepare_rows(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift, weights=None) -> "TokenRows":
    """Check the arguments shared by the public ops and flatten the batch to :class:`TokenRows`."""
    check_head(hidden, weight, bias)
    targets = check_targets(targets, hidden, weight.shape[0], ignore_index)
    dtype = compute_dtype(hidden.dtype)
    check_temperature(temperature, targets, dtype)
    check_positive_number("softcap", softcap, allow_none=True)
    if softcap is not None:
        check_in_compute_dtype("softcap", softcap, dtype)
    check_weights(weights, targets)
    check_flag("shift", shift)
    return token_rows(hidden, targets, temperature=temperature, weights=weights, ignore_index=int(ignore_index),
                      shift=shift)
