"""The flattening of a checked batch into the token rows that are computed.

Ignored tokens (``target == ignore_index``) are dropped before any backend runs: no FLOPs are spent
on them, their outputs are 0 and they receive no gradient.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import checks


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of logits, statistics and gradient accumulation: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def target_mask(targets: Tensor, ignore_index: int, shift: bool) -> Tensor:
    """Bool mask of the (shifted) targets that carry loss: ``targets[..., 1:]`` when ``shift``; compared
    as int64, like :func:`check_targets`, so a narrow integer type cannot wrap around ``ignore_index``."""
    checks.require_tensor("targets", targets)
    if shift:
        if targets.dim() == 0:
            raise ValueError("shift=True needs targets with at least one dimension to shift along")
        targets = targets[..., 1:]
    return targets.long() != ignore_index


def target_shape(targets: Tensor, shift: bool) -> torch.Size:
    """The shape of per-target values, inputs and outputs alike: ``targets.shape``, one position shorter
    along the last dim with ``shift`` (the shape of :func:`target_mask`)."""
    shape = targets.shape
    return torch.Size((*shape[:-1], shape[-1] - 1)) if shift and len(shape) else shape


def wants_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will differentiate through any of ``tensors`` (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


HIDDEN_GRAD_SLICE = 8192  # rows of hidden's gradient converted and placed at a time


@dataclass
class TokenRows:
    """The tokens of a batch that are not ignored, flattened to rows.

    ``hidden [N, D]`` is the caller's ``hidden`` flattened (a view where its strides allow, still on
    the autograd graph); the ``n`` computed rows are ``hidden[hidden_index]`` (``hidden_index [n]``
    int64, distinct rows; None: all ``N`` rows in order). No copy of them is made for the whole
    batch: backends gather them a chunk at a time (:meth:`hidden_rows`).
    ``targets [n]`` int64, ``temperature`` a float or a detached ``[n]`` tensor, ``token_weights`` a
    detached ``[n]`` tensor or None; all tensors but ``hidden`` are in the compute dtype.
    ``out_index [n]`` holds each row's position in the flattened output (None: rows are the output, in order).
    ``hidden_grad_group``: the process group over which ``hidden``'s gradient is summed, in the compute
    dtype before it is placed (a vocabulary-parallel call, :mod:`osft_kernels.vocab_parallel`), or None.
    """

    hidden: Tensor
    targets: Tensor
    temperature: float | Tensor
    token_weights: Tensor | None
    out_shape: torch.Size
    out_index: Tensor | None
    hidden_index: Tensor | None = None
    hidden_grad_group: "dist.ProcessGroup | None" = None

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


def hidden_grad(d_rows: Tensor, hidden_index: Tensor | None, shape: torch.Size, dtype: torch.dtype,
                group: "dist.ProcessGroup | None" = None) -> Tensor:
    """A gradient ``[n, D]`` of the computed rows (:class:`TokenRows`) as the gradient ``shape = [N, D]`` of
    ``hidden`` in ``dtype``, 0 at rows not computed (``d_rows`` itself when nothing changes). Converted
    and placed ``HIDDEN_GRAD_SLICE`` rows at a time, so no second full-size temporary exists. With a
    ``group``, ``d_rows`` (the caller's to overwrite) is first summed over its ranks, in its dtype."""
    if group is not None:
        dist.all_reduce(d_rows, group=group)
    if hidden_index is None:
        return d_rows.to(dtype)
    d_hidden = d_rows.new_zeros(shape, dtype=dtype)
    for start in range(0, hidden_index.shape[0], HIDDEN_GRAD_SLICE):
        rows = slice(start, start + HIDDEN_GRAD_SLICE)
        d_hidden.index_copy_(0, hidden_index[rows], d_rows[rows].to(dtype))
    return d_hidden


def token_rows(hidden: Tensor, targets: Tensor, *, temperature, token_weights, ignore_index: int,
               shift: bool) -> TokenRows:
    """Flatten a checked batch; with ``shift`` position t is paired with target t+1 (last position dropped).

    ``token_weights`` are already per target (:func:`target_shape`); ``temperature`` describes the
    logits and stays with the position that produces them.
    """
    dtype = compute_dtype(hidden.dtype)
    positions = None
    if isinstance(temperature, Tensor):
        temperature = temperature.detach().to(dtype).expand(targets.shape)
    weights = None if token_weights is None else token_weights.detach().to(dtype)
    if shift:
        if targets.dim() == 0:
            raise ValueError("shift=True needs targets with at least one dimension to shift along")
        positions = torch.arange(targets.numel(), device=targets.device).view(targets.shape)[..., :-1]
        targets = targets[..., 1:]
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
        token_weights=None if weights is None else rows_of(weights),
        out_shape=targets.shape,
        out_index=out_index,
        hidden_index=source_rows,
    )


def prepare_rows(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift,
                 token_weights=None, vocab_size: int | None = None) -> "TokenRows":
    """Check the arguments shared by the public ops and flatten the batch to :class:`TokenRows`;
    ``vocab_size``: the range of the targets (default ``weight``'s rows; the whole vocabulary when
    ``weight`` is one rank's shard of it)."""
    checks.check_head(hidden, weight, bias)
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    targets = checks.check_targets(targets, hidden, vocab_size, ignore_index)
    dtype = compute_dtype(hidden.dtype)
    checks.check_temperature(temperature, targets, dtype)
    checks.check_positive_number("softcap", softcap, allow_none=True)
    if softcap is not None:
        checks.check_in_compute_dtype("softcap", softcap, dtype)
    checks.check_flag("shift", shift)
    checks.check_token_weights(token_weights, target_shape(targets, shift), shift, targets.device)
    return token_rows(hidden, targets, temperature=temperature, token_weights=token_weights,
                      ignore_index=int(ignore_index), shift=shift)
