"""How per-token losses ``L [..., T]`` become one scalar: the coefficients ``c`` of ``sum(c * L)``.

Every aggregation used by SFT/OSFT, PEAR and the GRPO family is linear in the token losses, so it
is expressed once, here, as per-token coefficients (detached, float32, 0 at masked tokens). The
leading dimensions of ``mask`` index sequences and the last one their tokens:

==========================  ============================================  ==========================
``agg``                     loss                                          ``num_items`` replaces
==========================  ============================================  ==========================
``token-mean``              ``sum_{i,t} L m / sum_{i,t} m``               the token count
``seq-mean-token-mean``     ``mean_i (sum_t L m / sum_t m)``              the sequence count
``seq-mean-token-sum``      ``mean_i sum_t L m``                          the sequence count
``seq-mean-token-sum-norm`` ``sum_{i,t} L m / (B * norm_length)``         ``B``
``constant``                ``sum_{i,t} L m / norm_length``               (not allowed)
==========================  ============================================  ==========================

``mean_i`` runs over sequences with at least one token (as verl does), or over all ``B`` with
``count_empty_sequences=True`` (TRL's ``grpo``/``sapo``/``luspo``); ``B`` is the number of
sequences, empty or not, and ``norm_length`` defaults to ``T`` (Dr. GRPO's constant normalizer). An
empty batch gives all-zero coefficients: a zero loss with zero gradients, never a NaN.

``num_items`` is the count over the whole accumulated batch (all micro-batches), so that summing
the losses of micro-batches gives the full batch's gradient (TRL's ``loss_type="dapo"``). With
several data-parallel ranks it depends on how their gradients are combined:

- summed (a plain ``all_reduce``): the count over all ranks;
- averaged (DDP, FSDP, DeepSpeed ZeRO): the count over all ranks divided by the world size, which
  :func:`ddp_num_items` returns. verl's ``agg_loss`` (global count, times ``dp_size``) and TRL's
  ``dapo``/``cispo`` (``num_items_in_batch / num_processes``) do exactly this;
- one process (``osft``'s loop): the count of the step's batch.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from ..checks import check_positive_number, is_finite_number
from .checks import AGGREGATIONS, check_mask

# the ``normalize`` names of the SFT and PEAR losses
NORMALIZATIONS = {"tokens": "token-mean", "sequences": "seq-mean-token-mean"}


def _positive_count(name: str, value) -> float | None:
    """None, or ``value`` as a float after checking that it is a finite number > 0."""
    if value is None:
        return None
    check_positive_number(name, value)
    return float(value)


def count_items(mask: Tensor, agg: str = "token-mean", *, count_empty_sequences: bool = False) -> float:
    """What ``agg``'s mean divides by over ``mask [..., T]``, the last column of the table: the
    token count, the sequence count (non-empty ones, or all with ``count_empty_sequences``), or
    ``B``; at least 1, so that an empty batch gives a zero loss. Passed as ``num_items``, the count
    of a whole batch makes the losses of its micro-batches sum to the batch's."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if agg == "constant":
        raise ValueError("agg='constant' divides by norm_length, not by a count")
    mask = check_mask(mask, mask)
    if mask.dim() < 1:
        raise ValueError("mask must have at least one dimension (tokens)")
    return _count(mask, agg, count_empty_sequences)


def _count(mask: Tensor, agg: str, count_empty_sequences: bool) -> float:
    """:func:`count_items` of a checked bool ``mask`` and a counted ``agg``."""
    if agg == "token-mean":
        return max(float(mask.sum()), 1.0)
    if agg == "seq-mean-token-sum-norm":
        return max(float(mask.shape[:-1].numel()), 1.0)
    tokens = mask.sum(-1)
    return max(float(tokens.numel() if count_empty_sequences else (tokens > 0).sum()), 1.0)


def aggregation_weights(mask: Tensor, agg: str = "token-mean", *, num_items: float | None = None,
                        norm_length: float | None = None, count_empty_sequences: bool = False,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """Coefficients ``c`` (``mask.shape``, ``dtype``, detached) with ``aggregate(L) = sum(c * L)``.

    Args:
        mask: ``[..., T]`` (at least one dimension), bool or 0/1, True at tokens that carry loss.
        agg: one of :data:`AGGREGATIONS` (table in the module docstring).
        num_items: the global count the mean divides by, for gradient accumulation.
        norm_length: the constant of ``seq-mean-token-sum-norm`` and ``constant`` (default ``T``).
        count_empty_sequences: the ``seq-mean-*`` modes divide by all sequences, empty ones
            included (TRL), instead of the non-empty ones (verl); no effect with ``num_items``.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    mask = check_mask(mask, mask)
    if mask.dim() < 1:
        raise ValueError("mask must have at least one dimension (tokens)")
    if not isinstance(count_empty_sequences, bool):
        raise TypeError(f"count_empty_sequences must be a bool, got {count_empty_sequences!r}")
    num_items = _positive_count("num_items", num_items)
    norm_length = _positive_count("norm_length", norm_length)
    if agg == "constant" and num_items is not None:
        raise ValueError("num_items has no meaning for agg='constant'; scale norm_length instead")
    m = mask.to(dtype)
    length = float(mask.shape[-1]) if norm_length is None else norm_length
    if agg == "constant":
        return m / length
    count = num_items or _count(mask, agg, count_empty_sequences)
    if agg == "token-mean":
        return m / count
    if agg == "seq-mean-token-sum-norm":
        return m / (count * length)
    if agg == "seq-mean-token-sum":
        return m / count
    return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * count)  # seq-mean-token-mean


def aggregate(token_loss: Tensor, mask: Tensor, agg: str = "token-mean", *, num_items: float | None = None,
              norm_length: float | None = None, count_empty_sequences: bool = False) -> Tensor:
    """``sum(aggregation_weights(mask, ...) * token_loss)``: a scalar, differentiable in ``token_loss``.

    ``mask`` must have ``token_loss``'s shape (bool or 0/1; no broadcasting). Masked positions are
    excluded with ``where``, so a NaN or inf there cannot leak into the result.
    """
    if not isinstance(token_loss, Tensor):
        raise TypeError(f"token_loss must be a torch.Tensor, got {type(token_loss).__name__}")
    mask = check_mask(mask.to(token_loss.device) if isinstance(mask, Tensor) else mask, token_loss)
    dtype = torch.promote_types(token_loss.dtype, torch.float32)
    weights = aggregation_weights(mask, agg, num_items=num_items, norm_length=norm_length,
                                  count_empty_sequences=count_empty_sequences, dtype=dtype)
    return torch.where(mask, token_loss * weights, 0.0).sum()


def ddp_num_items(local_count: float | Tensor, group=None) -> float:
    """``num_items`` for ranks whose gradients are averaged (DDP, FSDP): the sum of every rank's
    ``local_count`` over ``group`` (at least 1) divided by its size, so that the averaged gradient is
    the whole batch's. Without an initialized process group, ``max(local_count, 1)``. Every rank of
    ``group`` must call it (it is one ``all_reduce``)."""
    if isinstance(local_count, Tensor) and local_count.numel() == 1:
        local_count = local_count.item()
    if not is_finite_number(local_count) or local_count < 0:
        raise ValueError(f"local_count must be a finite number >= 0, got {local_count!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return max(float(local_count), 1.0)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    total = torch.tensor(float(local_count), dtype=torch.float64, device=device)
    dist.all_reduce(total, group=group)
    return max(float(total), 1.0) / dist.get_world_size(group)
