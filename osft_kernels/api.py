"""The public functions: per-token logprobs/entropy and cross-entropy from hidden states and the
output layer, without materializing ``[tokens, vocab]`` logits.

Logits of token i over vocabulary entry j::

    s_ij = (hidden_i . weight_j + bias_j) * logit_scale
    s_ij = softcap * tanh(s_ij / softcap)          (if softcap)
    z_ij = s_ij / temperature_i
"""
import functools
from typing import NamedTuple

import torch
from torch import Tensor

from . import checks, dtensor_head, token_rows, vocab_parallel
from .backend import BackendOptions
from .backends import resolve_backend
from .row_stats import (
    RowStats,
    token_cross_entropy,
    token_is_top1,
    token_log_sum_sq_probs,
    token_logprobs,
)


class LogProbs(NamedTuple):
    """``logprobs``: log p(target), float32 (float64 for float64 inputs), shaped like the (shifted)
    targets, 0 at ignored positions. ``entropy``: same shape and dtype, or None."""

    logprobs: Tensor
    entropy: Tensor | None


def _outside_autocast(fn):
    """Runs a public op with autocast off on ``hidden``'s device: the ops pick their own precision
    (float32 statistics and outputs, as documented) inside the caller's autocast region too."""
    @functools.wraps(fn)
    def wrapper(hidden, *args, **kwargs):
        if isinstance(hidden, Tensor) and not hidden.is_meta and torch.is_autocast_enabled(hidden.device.type):
            with torch.autocast(hidden.device.type, enabled=False):
                return fn(hidden, *args, **kwargs)
        return fn(hidden, *args, **kwargs)
    return wrapper


def _fold_logit_scale(logit_scale, temperature, softcap) -> tuple:
    """``(temperature, softcap)`` that apply a constant logit multiplier ``a`` (Cohere's ``logit_scale``,
    Granite's ``1 / logits_scaling``) before the softcap: ``c tanh(a s / c) / T = (c/a) tanh(s / (c/a)) / (T/a)``,
    so ``softcap / a`` and ``temperature / a`` (also ``s * a / T = s / (T/a)`` without a softcap)."""
    checks.check_positive_number("logit_scale", logit_scale)
    if logit_scale == 1:
        return temperature, softcap
    if isinstance(temperature, Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"temperature tensor must be floating point, got {temperature.dtype}")
    else:
        checks.check_positive_number("temperature", temperature)
    temperature = temperature / logit_scale
    if softcap is not None:
        checks.check_positive_number("softcap", softcap, allow_none=True)
        softcap = softcap / logit_scale
    return temperature, softcap


def _tracing(process_group) -> bool:
    """Whether ``torch.compile`` is tracing the call (which the vocabulary-parallel ops refuse)."""
    if not torch.compiler.is_compiling():
        return False
    if process_group is not None:
        raise NotImplementedError("process_group (vocabulary-parallel ops) is not supported under torch.compile; "
                                  "call the op outside the compiled region (torch.compiler.disable)")
    return True


def _rows_and_backend(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift, backend,
                      process_group, reduce_hidden_grad, token_weights=None):
    """The checked :class:`~osft_kernels.token_rows.TokenRows` of a call and the backend that computes them:
    with a ``process_group``, this rank's shard of a vocabulary-parallel call (:mod:`osft_kernels.vocab_parallel`)."""
    vocab_parallel.check_process_group(process_group)
    checks.check_flag("reduce_hidden_grad", reduce_hidden_grad)
    shard = None if process_group is None else vocab_parallel.VocabShard.of(process_group, hidden, weight)
    rows = token_rows.prepare_rows(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift,
                                   token_weights, vocab_size=None if shard is None else shard.vocab_size)
    impl = resolve_backend(backend, hidden.device)
    if shard is None:
        return rows, impl
    return shard.local_rows(rows, reduce_hidden_grad=reduce_hidden_grad), shard.backend(impl)


@_outside_autocast
def linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                    temperature: float | Tensor = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False, shift: bool = False, backend: str = "auto",
                    memory_budget: int | None = None, process_group=None, reduce_hidden_grad: bool = True) -> LogProbs:
    """Log-probabilities of ``targets`` (and the softmax entropy) under ``softmax(z)``.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16 (float64 for verification).
        weight: ``[V, D]``, hidden's dtype. bias: ``[V]`` or None.
        targets: integer ``hidden.shape[:-1]``, values in ``[0, V)`` or ``ignore_index``.
        temperature: float > 0, or a tensor broadcastable to ``targets.shape`` (per row; no grad).
        softcap: None or float > 0 (``softcap * tanh(s / softcap)`` before temperature).
        logit_scale: float > 0 multiplying the logits before the softcap (Cohere's ``logit_scale``,
            Granite's ``1 / logits_scaling``); folded into softcap and temperature.
        return_entropy: also return ``entropy_i = lse_i - sum_j p_ij z_ij``.
        shift: position t predicts target t+1 along the last dim; the last position is dropped.
            Every per-token output, and every per-target input of the losses, is then shaped like
            ``targets[..., 1:]`` (:func:`osft_kernels.target_shape`).
        backend: ``"auto"`` (``"triton"`` for CUDA tensors when triton is installed, ``"cpu"``
            for CPU tensors when its C++ extension is built, else ``"torch"``), ``"triton"``
            (cuBLAS GEMMs with Triton epilogues; a fused Triton kernel when no gradient is
            wanted), ``"cpu"`` (BLAS tiles with a C++ SIMD epilogue in cache), ``"torch"`` (the
            same chunked driver with PyTorch epilogues) or ``"reference"`` (materializes logits).
        memory_budget: bytes of logits chunk buffers of the chunked backends (default 128 MiB on
            CPU, 1 GiB on CUDA); larger chunks mean fewer, larger GEMMs.
        process_group: vocabulary parallelism over a ``torch.distributed`` group: each rank passes
            its own contiguous shard of the vocabulary as ``weight`` (and ``bias``), shards in rank
            order, and the same ``hidden`` and (global) ``targets``. Every rank gets the results of
            the whole vocabulary; only per-token statistics cross ranks. ``weight``'s gradient is the
            rank's slice of the whole one; ``hidden``'s is summed over the ranks in backward unless
            ``reduce_hidden_grad=False`` (for frameworks that reduce it themselves). Not under
            ``torch.compile``.

    ``weight`` and ``bias`` may be DTensors (:mod:`osft_kernels.dtensor_head`): FSDP2's sharded
    parameters are gathered once per call with their gradients averaged over the mesh as FSDP2
    averages its own; with ``process_group``, a layer sharded along the vocabulary is used in place.

    Backward accepts any upstream gradient on ``logprobs`` and ``entropy`` and returns gradients
    for ``hidden``, ``weight`` and ``bias`` in their dtype (recomputing the logits: 8NDV FLOPs in
    all); gradients are deterministic on every backend.
    """
    checks.check_flag("return_entropy", return_entropy)
    out = linear_token_outputs(hidden, weight, targets, outputs=("logprobs", "entropy") if return_entropy else (),
                               bias=bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                               ignore_index=ignore_index, shift=shift, backend=backend, memory_budget=memory_budget,
                               process_group=process_group, reduce_hidden_grad=reduce_hidden_grad)
    return LogProbs(out.logprobs, out.entropy)


class TokenOutputs(NamedTuple):
    """What :func:`linear_token_outputs` returns: each field shaped like the (shifted) targets, 0 (False)
    at ignored positions, None unless requested (``logprobs`` always).

    ``logprobs`` and ``entropy``: float32 (float64 for float64 inputs), differentiable.
    ``mean_logit``: ``mean_j z_j``; ``log_sum_sq_probs``: ``log sum_j p_j^2``; ``is_top1``: bool, whether
    the target is the most likely token (ties count). These three carry no gradient.
    """

    logprobs: Tensor
    entropy: Tensor | None = None
    mean_logit: Tensor | None = None
    is_top1: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None


@_outside_autocast
def linear_token_outputs(hidden: Tensor, weight: Tensor, targets: Tensor, *, outputs=("logprobs",),
                         bias: Tensor | None = None, temperature: float | Tensor = 1.0, softcap: float | None = None,
                         logit_scale: float = 1.0, ignore_index: int = -100, shift: bool = False, backend: str = "auto",
                         memory_budget: int | None = None, process_group=None,
                         reduce_hidden_grad: bool = True) -> TokenOutputs:
    """Per-token logprobs and, as ``outputs`` names them, entropy and the metrics of :class:`TokenOutputs`
    (``"logprobs"``, ``"entropy"``, ``"mean_logit"``, ``"is_top1"``, ``"log_sum_sq_probs"``), all from one
    pass over the logits. Arguments and gradients as in :func:`linear_logprobs`."""
    wanted = checks.check_outputs(outputs, TokenOutputs._fields)
    weight, bias = dtensor_head.plain_head(hidden, weight, bias, process_group)
    options = checks.backend_options(memory_budget)
    temperature, softcap = _fold_logit_scale(logit_scale, temperature, softcap)
    flags = dict(entropy="entropy" in wanted, mean="mean_logit" in wanted, square="log_sum_sq_probs" in wanted)
    if _tracing(process_group):
        stats = _traced_stats(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift, **flags,
                              backend=backend, options=options)
        valid = token_rows.target_mask(targets, ignore_index, shift)
        return _token_outputs(RowStats.of(stats), wanted, lambda x: torch.where(valid, x, x.new_zeros(())))
    rows, impl = _rows_and_backend(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift, backend,
                                   process_group, reduce_hidden_grad)
    stats = impl.row_stats(rows, weight, bias, softcap, **flags, options=options)
    return _token_outputs(RowStats.of(stats), wanted, rows.scatter)


def _token_outputs(row: RowStats, wanted: frozenset, place) -> TokenOutputs:
    """The requested outputs from the statistics, each placed on the targets' grid by ``place``."""
    return TokenOutputs(
        logprobs=place(token_logprobs(row)),
        entropy=place(row.entropy) if "entropy" in wanted else None,
        mean_logit=place(row.mean_logit.detach()) if "mean_logit" in wanted else None,
        is_top1=place(token_is_top1(row)) if "is_top1" in wanted else None,
        log_sum_sq_probs=place(token_log_sum_sq_probs(row).detach()) if "log_sum_sq_probs" in wanted else None,
    )


@_outside_autocast
def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                         token_weights: Tensor | None = None, temperature: float | Tensor = 1.0,
                         softcap: float | None = None, logit_scale: float = 1.0, label_smoothing: float = 0.0,
                         z_loss: float = 0.0, ignore_index: int = -100, reduction: str = "mean", shift: bool = False,
                         backend: str = "auto", memory_budget: int | None = None, process_group=None,
                         reduce_hidden_grad: bool = True, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of ``targets`` under ``softmax(z)``, per token::

        (1 - label_smoothing) * (lse - z_y) + label_smoothing * (lse - mean_j z_j) + z_loss * lse**2

    times ``token_weights`` when given: per target, shaped like the per-token outputs (``targets``,
    ``targets[..., 1:]`` with ``shift``), no grad. ``weights`` is its deprecated alias, shaped like
    ``targets`` whatever ``shift``. ``reduction``: ``"none"``
    (per token, 0 at ignored positions), ``"sum"``, or ``"mean"`` (sum over the number of
    non-ignored tokens; 0 with zero gradients when every token is ignored). Other arguments as in
    :func:`linear_logprobs`. Returns float32 (float64 for float64 inputs).

    With ``"sum"``/``"mean"`` and gradients enabled, the chunked backends form the gradients
    during the forward pass (6NDV FLOPs instead of 8NDV) and keep ``d_hidden`` and ``d_weight``
    in float32 until backward.
    """
    checks.check_label_smoothing(label_smoothing)
    checks.check_z_loss(z_loss)
    weight, bias = dtensor_head.plain_head(hidden, weight, bias, process_group)
    options = checks.backend_options(memory_budget)
    temperature, softcap = _fold_logit_scale(logit_scale, temperature, softcap)
    if reduction not in checks.REDUCTIONS:
        raise ValueError(f"reduction must be one of {checks.REDUCTIONS}, got {reduction!r}")
    token_weights = checks.renamed_weights(weights, token_weights, targets, shift, stacklevel=3)  # above the wrapper
    if _tracing(process_group):
        return _traced_cross_entropy(hidden, weight, targets, bias, token_weights, temperature, softcap,
                                     float(label_smoothing), float(z_loss), ignore_index, reduction, shift,
                                     backend=backend, options=options)
    rows, impl = _rows_and_backend(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift, backend,
                                   process_group, reduce_hidden_grad, token_weights)
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)

    if reduction != "none":
        n = rows.targets.shape[0]
        token_weight = rows.token_weights if rows.token_weights is not None else rows.targets.new_ones(
            n, dtype=token_rows.compute_dtype(hidden.dtype))
        if reduction == "mean":
            token_weight = token_weight / max(n, 1)
        if token_rows.wants_grad(hidden, weight, bias) and impl.summed_loss is not None:
            def token_loss(stats: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
                return token_cross_entropy(RowStats.of(stats), label_smoothing, z_loss) * token_weight[r0:r1]

            return impl.summed_loss(rows, weight, bias, softcap, token_loss, entropy=False, mean=label_smoothing > 0,
                                    options=options)[0]

    stats = RowStats.of(impl.row_stats(rows, weight, bias, softcap, entropy=False, mean=label_smoothing > 0,
                                       square=False, options=options))
    loss = token_cross_entropy(stats, label_smoothing, z_loss)
    if reduction == "none":
        return rows.scatter(loss if rows.token_weights is None else loss * rows.token_weights)
    return (loss * token_weight).sum()


@_outside_autocast
def linear_token_loss(hidden: Tensor, weight: Tensor, targets: Tensor, token_loss, *, return_entropy: bool = False,
                      bias: Tensor | None = None, temperature: float | Tensor = 1.0, softcap: float | None = None,
                      logit_scale: float = 1.0, ignore_index: int = -100, shift: bool = False, backend: str = "auto",
                      memory_budget: int | None = None, process_group=None,
                      reduce_hidden_grad: bool = True) -> tuple[Tensor, LogProbs]:
    """``sum_t token_loss(logprobs_t, entropy_t)`` over the non-ignored (shifted) target tokens, with the
    gradients formed during the forward pass on the chunked backends: 6NDV FLOPs where
    :func:`linear_logprobs` followed by the same loss in PyTorch takes 8NDV.

    ``token_loss(logprobs [r], entropy [r] | None, index [r]) -> [r]`` gives the losses of ``r`` tokens
    (float32; ``entropy`` when ``return_entropy``); ``index`` holds their positions in the flattened
    ``logprobs`` grid (shaped like the shifted targets), for gathering per-token values such as
    advantages or loss weights. It is called once per token chunk, must treat tokens independently,
    and may depend only on values fixed before the call (no gradient flows into them).

    Returns the float32 scalar loss and the detached :class:`LogProbs` of every token (0 at ignored
    positions). Other arguments as in :func:`linear_logprobs`.
    """
    if not callable(token_loss):
        raise TypeError(f"token_loss must be callable, got {type(token_loss).__name__}")
    checks.check_flag("return_entropy", return_entropy)
    weight, bias = dtensor_head.plain_head(hidden, weight, bias, process_group)
    options = checks.backend_options(memory_budget)
    temperature, softcap = _fold_logit_scale(logit_scale, temperature, softcap)
    rows, impl = _rows_and_backend(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift, backend,
                                   process_group, reduce_hidden_grad)
    positions = (rows.out_index if rows.out_index is not None
                 else torch.arange(rows.targets.shape[0], device=rows.targets.device))

    def loss_of_stats(stats: Tensor, r0: int, r1: int) -> Tensor:
        row = RowStats.of(stats)
        return token_loss(token_logprobs(row), row.entropy if return_entropy else None, positions[r0:r1])

    if token_rows.wants_grad(hidden, weight, bias) and impl.summed_loss is not None:
        loss, stats = impl.summed_loss(rows, weight, bias, softcap, loss_of_stats, entropy=return_entropy,
                                       mean=False, options=options)
    else:
        stats = impl.row_stats(rows, weight, bias, softcap, entropy=return_entropy, mean=False, square=False,
                               options=options)
        loss = loss_of_stats(stats, 0, rows.targets.shape[0]).sum()
        stats = stats.detach()
    row = RowStats.of(stats)
    entropy = rows.scatter(row.entropy) if return_entropy else None
    return loss, LogProbs(rows.scatter(token_logprobs(row)), entropy)


def _split_temperature(temperature) -> tuple[Tensor | None, float]:
    """A custom op takes a tensor and a float separately: ``(tensor, 1.0)`` or ``(None, float)``."""
    return (temperature, 1.0) if isinstance(temperature, Tensor) else (None, float(temperature))


def _check_traced(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift) -> None:
    """The checks that need no tensor values, at trace time; the custom ops check the values when they run."""
    checks.check_head(hidden, weight, bias)
    checks.require_tensor("targets", targets)
    checks.check_ignore_index(ignore_index)
    if not isinstance(temperature, Tensor):
        checks.check_positive_number("temperature", temperature)
    checks.check_positive_number("softcap", softcap, allow_none=True)
    checks.check_flag("shift", shift)


def _traced_stats(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift, *, entropy: bool,
                  mean: bool, square: bool, backend: str, options: BackendOptions) -> Tensor:
    """Under ``torch.compile``: the statistics grid ``[*out_shape, NUM_STATS]`` from the
    ``osft_kernels::row_stats`` op."""
    _check_traced(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift)
    tensor, value = _split_temperature(temperature)
    return torch.ops.osft_kernels.row_stats(hidden, weight, targets, bias, tensor, value, softcap, int(ignore_index),
                                            shift, entropy, mean, square, backend, options.memory_budget)


def _traced_cross_entropy(hidden, weight, targets, bias, token_weights, temperature, softcap, label_smoothing: float,
                          z_loss: float, ignore_index, reduction: str, shift: bool, *, backend: str,
                          options: BackendOptions) -> Tensor:
    """Under ``torch.compile``: the loss from the statistics grid of the ``osft_kernels::row_stats`` op, whose
    backward recomputes the logits (8NDV where the eager ``"sum"``/``"mean"`` path takes 6NDV)."""
    stats = _traced_stats(hidden, weight, targets, bias, temperature, softcap, ignore_index, shift, entropy=False,
                          mean=label_smoothing > 0, square=False, backend=backend, options=options)
    loss = token_cross_entropy(RowStats.of(stats), label_smoothing, z_loss)
    if token_weights is not None:
        checks.check_token_weights(token_weights, token_rows.target_shape(targets, shift), shift, targets.device,
                                   values=False)
        loss = loss * token_weights.detach().to(loss.dtype)
    valid = token_rows.target_mask(targets, ignore_index, shift)
    loss = torch.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    return loss.sum() / valid.sum().clamp(min=1) if reduction == "mean" else loss.sum()
