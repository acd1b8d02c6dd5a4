"""The implementations the kernel benchmarks compare, and the operations they run.

Each implementation maps ``(op, hidden, weight, targets, upstream)`` to the outputs of one training
(or scoring) call: the forward values and, unless the op is forward-only, the gradients of
``hidden`` and ``weight``. Operations:

* ``ce``: mean cross-entropy, forward + backward;
* ``logprobs``: per-token logprobs, backward of ``sum(logprobs * upstream[0])``;
* ``logprobs_entropy``: logprobs and entropy, backward of ``sum(lp * up[0] + entropy * up[1])``;
* ``logprobs_forward``: logprobs without gradients (scoring).

Targets equal to ``IGNORE_INDEX`` (padding) count for nothing: cross-entropy is the mean over the
other tokens, and the per-token outputs (logprobs, entropy) are 0 there, as ``osft_kernels`` returns
them; an implementation without an ``ignore_index`` of its own masks its per-token outputs to match.
An implementation that cannot run an op on a device says why (:func:`unavailable`).
"""
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from osft_kernels import linear_cross_entropy, linear_logprobs

OPS = ("ce", "logprobs", "logprobs_entropy", "logprobs_forward")
# FLOPs of an op in units of N*D*V: the logits GEMM, plus the two gradient GEMMs when trained
FLOPS_PER_NDV = {"ce": 6, "logprobs": 6, "logprobs_entropy": 6, "logprobs_forward": 2}
COMPILE_CHUNKS = 8
IGNORE_INDEX = -100


def _with_grads(op: str, hidden: Tensor, weight: Tensor, upstream, forward: Callable) -> tuple[Tensor, ...]:
    """Run ``forward`` (returning loss, or logprobs[, entropy]) and, unless forward-only, its backward."""
    if op == "logprobs_forward":
        with torch.no_grad():
            return (forward(),)
    outputs = forward()
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if op == "ce":
        total = outputs[0]
    else:
        total = sum((out * up).sum() for out, up in zip(outputs, upstream))
    return (*(out.detach() for out in outputs), *torch.autograd.grad(total, (hidden, weight)))


def _entropy_from_logprobs(logp: Tensor) -> Tensor:
    return -(logp.exp() * logp).sum(-1)


def _masked(values: Tensor, targets: Tensor) -> Tensor:
    """Per-token ``values`` with 0 where the target is ``IGNORE_INDEX`` (no gradient flows there)."""
    return torch.where(targets != IGNORE_INDEX, values, values.new_zeros(()))


def _picked_logprobs(logp: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The targets' logprobs and the entropies of ``logp [N, V]``, masked at ignored targets."""
    picked = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return _masked(picked, targets), _masked(_entropy_from_logprobs(logp), targets)


def naive(op, hidden, weight, targets, upstream):
    """``hidden @ weight.T`` in float32 (float64 for float64 inputs: the guard's reference), then
    ``F.cross_entropy`` or ``log_softmax`` + gather."""
    def forward():
        logits = hidden @ weight.T
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if op == "ce":
            return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
        picked, entropy = _picked_logprobs(torch.log_softmax(logits, -1), targets)
        return (picked, entropy) if op == "logprobs_entropy" else picked
    return _with_grads(op, hidden, weight, upstream, forward)


def torch_native(op, hidden, weight, targets, upstream):
    """PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (cross-entropy only)."""
    return _with_grads(op, hidden, weight, upstream,
                       lambda: F.linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX))


def _chunk_ce(h, w, y):
    return F.cross_entropy(h @ w.T, y, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_logprobs(h, w, y):
    return _picked_logprobs(torch.log_softmax((h @ w.T).float(), -1), y)


_compiled: dict[str, Callable] = {}


def compiled_chunked(op, hidden, weight, targets, upstream):
    """The common hand-rolled alternative: tokens split into 8 chunks, each a ``torch.compile``d
    linear + loss, differentiated by plain autograd (so each chunk's logits are kept for backward)."""
    if not _compiled:
        # one graph per shape, dtype and grad mode (guard and full shape each): more than dynamo's default
        # limit of 8 in a full run, past which it would silently run the chunks eagerly
        from torch._dynamo import config
        config.recompile_limit = max(config.recompile_limit, 64)
        _compiled["ce"] = torch.compile(_chunk_ce, dynamic=False)
        _compiled["logprobs"] = torch.compile(_chunk_logprobs, dynamic=False)

    def forward():
        chunks = zip(hidden.chunk(COMPILE_CHUNKS), targets.chunk(COMPILE_CHUNKS))
        if op == "ce":
            tokens = (targets != IGNORE_INDEX).sum()
            return sum(_compiled["ce"](h, weight, y) for h, y in chunks) / tokens
        parts = [_compiled["logprobs"](h, weight, y) for h, y in chunks]
        logp = torch.cat([p[0] for p in parts])
        return (logp, torch.cat([p[1] for p in parts])) if op == "logprobs_entropy" else logp
    return _with_grads(op, hidden, weight, upstream, forward)


def _cce(impl: str):
    def run(op, hidden, weight, targets, upstream):
        from cut_cross_entropy import linear_cross_entropy as cce

        def forward():
            if op == "ce":
                return cce(hidden, weight, targets, ignore_index=IGNORE_INDEX, impl=impl)
            return -cce(hidden, weight, targets, ignore_index=IGNORE_INDEX, impl=impl, reduction="none")
        return _with_grads(op, hidden, weight, upstream, forward)
    run.__doc__ = f"Cut Cross-Entropy, ``impl={impl!r}`` (its ``ignore_index``: 0 loss at ignored tokens)."
    return run


def liger(op, hidden, weight, targets, upstream):
    """Liger-Kernel's fused linear cross-entropy (``LigerFusedLinearCrossEntropyLoss``)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
    return _with_grads(op, hidden, weight, upstream, lambda: loss(weight, hidden, targets))


TRL_CHUNK_TOKENS = 32768  # the chunk size TRL 1.16's trainers pass to its kernel


def trl(op, hidden, weight, targets, upstream):
    """TRL 1.16's fused LM-head kernel (``trl.kernels.ChunkedLogProbFunction``, what its SFT/GRPO/RLOO/DPO/KTO
    trainers call: Triton on CUDA, a tiled PyTorch path elsewhere); cross-entropy as ``-mean(log_probs)`` over the
    kept tokens. It has no ``ignore_index`` (its trainers mask its outputs), so its logprobs and entropy are masked
    at ignored targets: no gradient reaches those rows."""
    from trl.kernels import ChunkedLogProbFunction

    outputs = ("entropy",) if op == "logprobs_entropy" else ()

    def forward():
        logp, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, TRL_CHUNK_TOKENS, None,
                                                         1.0, outputs)
        logp = _masked(logp, targets)
        if op == "ce":
            return -logp.sum() / (targets != IGNORE_INDEX).sum()
        return (logp, _masked(entropy, targets)) if op == "logprobs_entropy" else logp
    return _with_grads(op, hidden, weight, upstream, forward)


def gemm_ceiling(op, hidden, weight, targets, upstream):
    """Not a loss: the op's GEMMs alone in the input dtype (the logits product and, when trained, the
    two gradient products with the logits standing in for their gradient): the time a fused
    implementation can at best approach. Not checked against float64."""
    with torch.no_grad():
        logits = hidden @ weight.T
        if op == "logprobs_forward":
            return (logits[:, 0].float(),)
        return logits[:, 0].float(), logits @ weight, logits.T @ hidden


def ours(backend: str):
    def run(op, hidden, weight, targets, upstream):
        def forward():
            if op == "ce":
                return linear_cross_entropy(hidden, weight, targets, backend=backend)
            out = linear_logprobs(hidden, weight, targets, return_entropy=op == "logprobs_entropy", backend=backend)
            return (out.logprobs, out.entropy) if op == "logprobs_entropy" else out.logprobs
        return _with_grads(op, hidden, weight, upstream, forward)
    run.__doc__ = f"osft_kernels, ``backend={backend!r}``."
    return run


IMPLEMENTATIONS = {
    "naive": naive,
    "torch_native": torch_native,
    "compiled_chunked": compiled_chunked,
    "liger": liger,
    "cce": _cce("cce"),
    "cce_torch_compile": _cce("torch_compile"),
    "trl": trl,
    "ours_torch": ours("torch"),
    "ours_triton": ours("triton"),
    "ours_cpu": ours("cpu"),
    "gemm_ceiling": gemm_ceiling,
}
CEILINGS = {"gemm_ceiling"}
CE_ONLY = {"torch_native", "liger"}
NO_ENTROPY = {"cce", "cce_torch_compile"}
NEEDS_CUDA = {"liger": "Liger-Kernel's kernels are Triton: CUDA only",
              "cce": "CCE's 'cce' kernels are Triton: CUDA only",
              "ours_triton": "the triton backend runs on CUDA tensors (on CPU only in the interpreter, for tests)"}
PACKAGES = {"liger": "liger_kernel", "cce": "cut_cross_entropy", "cce_torch_compile": "cut_cross_entropy",
            "trl": "trl", "ours_triton": "triton"}


def unavailable(name: str, op: str, device: torch.device) -> str | None:
    """Why implementation ``name`` cannot run ``op`` on ``device``, or None when it can."""
    if name in CE_ONLY and op != "ce":
        return "cross-entropy only"
    if name in NO_ENTROPY and op == "logprobs_entropy":
        return "no entropy output"
    if name == "torch_native" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
        return f"{PACKAGES[name]} is not installed (pip install '.[bench]')"
    if name in NEEDS_CUDA and device.type != "cuda":
        return NEEDS_CUDA[name]
    if name == "ours_cpu":
        from osft_kernels.backends import cpu
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device.type}"
        if not cpu.available():
            return cpu.extension()[2]
    return None
