"""The contract between the ops and a backend: what :func:`osft_kernels.backends.resolve_backend`
returns, and what the ops call on it."""
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class BackendOptions:
    """Backend keywords: ``memory_budget``, bytes of logits chunk buffers of the chunked backends (None:
    their default; 0: none, which only the triton backend's fused forward can do, without gradients);
    ``plan_vocab``, the vocabulary size their chunks are planned for (None: ``weight``'s rows; the
    ranks of a vocabulary-parallel call set their largest shard, so that all run the same token chunks)."""

    memory_budget: int | None = None
    plan_vocab: int | None = None


@dataclass(frozen=True)
class Backend:
    """A backend as the ops call it, for a batch of token rows (:class:`osft_kernels.token_rows.TokenRows`:
    the caller's ``hidden [N, D]`` and the ``n`` rows of it that are computed). A target outside
    ``[0, V)`` of this ``weight`` (it lies in another rank's vocabulary shard) has target logit 0 and
    no gradient.

    - ``row_stats(rows, weight, bias, softcap, *, entropy, mean, square, options)``: the differentiable
      ``[n, NUM_STATS]`` statistics of :mod:`osft_kernels.row_stats`.
    - ``row_stats_grads(rows, weight, bias, softcap, stats, grad_stats, *, entropy, mean, options, needs)``:
      the gradients of ``(rows.hidden [N, D], weight, bias)`` (those ``needs`` asks for) from ``grad_stats``;
      what the ``torch.compile`` custom ops differentiate with (None where ``row_stats`` is differentiated
      by autograd only: the vocabulary-parallel ops).
    - ``summed_loss(rows, weight, bias, softcap, token_loss, *, entropy, mean, options)``:
      ``(sum_i token_loss_i, stats)`` with the gradients formed during the forward pass; None where
      the backend does not form them, and the ops then go through ``row_stats`` and autograd.
    """

    name: str
    row_stats: Callable[..., Tensor]
    row_stats_grads: Callable[..., tuple[Tensor | None, Tensor | None, Tensor | None]] | None = None
    summed_loss: Callable[..., tuple[Tensor, Tensor]] | None = None
