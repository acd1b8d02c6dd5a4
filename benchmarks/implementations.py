"""The implementations the kernel benchmarks compare, and the operations they run.

Each implementation maps ``(op, hidden, weight, targets, upstream)`` to the outputs of one training
(or scoring) call: the forward values and, unless the op is forward-only, the gradients of
``hidden`` and ``weight``. Operations:

* ``ce``: mean cross-entropy, forward + backward;
* ``logprobs``: per-token logprobs, backward of ``sum(logprobs * upstream[0])``;
* ``logprobs_entropy``: logprobs and entropy, backward of ``sum(lp * up[0] + entropy * up[1])``;
* ``logprobs_forward``: logprobs without gradients (scoring).

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


def naive(op, hidden, weight, targets, upstream):
    """``hidden @ weight.T`` in float32, then ``F.cross_entropy`` or ``log_softmax`` + gather."""
    def forward():
        logits = (hidden @ weight.T).float()
        if op == "ce":
            return F.cross_entropy(logits, targets)
        logp = torch.log_softmax(logits, -1)
        picked = logp.gather(1, targets[:, None]).squeeze(1)
        return (picked, _entropy_from_logprobs(logp)) if op == "logprobs_entropy" else picked
    return _with_grads(op, hidden, weight, upstream, forward)


def torch_native(op, hidden, weight, targets, upstream):
    """PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (cross-entropy only)."""
    return _with_grads(op, hidden, weight, upstream, lambda: F.linear_cross_entropy(hidden, weight, targets))


def _chunk_ce(h, w, y):
    return F.cross_entropy(h @ w.T, y, reduction="sum")


def _chunk_logprobs(h, w, y):
    logp = torch.log_softmax((h @ w.T).float(), -1)
    return logp.gather(1, y[:, None]).squeeze(1), _entropy_from_logprobs(logp)


_compiled: dict[str, Callable] = {}


def compiled_chunked(op, hidden, weight, targets, upstream):
    """The common hand-rolled alternative: tokens split into 8 chunks, each a ``torch.compile``d
    linear + loss, differentiated by plain autograd (so each chunk's logits are kept for backward)."""
    if not _compiled:
        _compiled["ce"] = torch.compile(_chunk_ce, dynamic=False)
        _compiled["logprobs"] = torch.compile(_chunk_logprobs, dynamic=False)

    def forward():
        chunks = zip(hidden.chunk(COMPILE_CHUNKS), targets.chunk(COMPILE_CHUNKS))
        if op == "ce":
            return sum(_compiled["ce"](h, weight, y) for h, y in chunks) / hidden.shape[0]
        parts = [_compiled["logprobs"](h, weight, y) for h, y in chunks]
        logp = torch.cat([p[0] for p in parts])
        return (logp, torch.cat([p[1] for p in parts])) if op == "logprobs_entropy" else logp
    return _with_grads(op, hidden, weight, upstream, forward)


def _cce(impl: str):
    def run(op, hidden, weight, targets, upstream):
        from cut_cross_entropy import linear_cross_entropy as cce

        def forward():
            if op == "ce":
                return cce(hidden, weight, targets, impl=impl)
            return -cce(hidden, weight, targets, impl=impl, reduction="none")
        return _with_grads(op, hidden, weight, upstream, forward)
    run.__doc__ = f"Cut Cross-Entropy, ``impl={impl!r}``."
    return run


def liger(op, hidden, weight, targets, upstream):
    """Liger-Kernel's fused linear cross-entropy (``LigerFusedLinearCrossEntropyLoss``)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    loss = LigerFusedLinearCrossEntropyLoss()
    return _with_grads(op, hidden, weight, upstream, lambda: loss(weight, hidden, targets))


TRL_CHUNK_TOKENS = 32768  # the chunk size TRL 1.16's trainers pass to its kernel


def trl(op, hidden, weight, targets, upstream):
    """TRL 1.16's fused LM-head kernel (``trl.kernels.ChunkedLogProbFunction``, what its SFT/GRPO/RLOO/DPO/KTO
    trainers call: Triton on CUDA, a tiled PyTorch path elsewhere); cross-entropy as ``-mean(log_probs)``."""
    from trl.kernels import ChunkedLogProbFunction

    outputs = ("entropy",) if op == "logprobs_entropy" else ()

    def forward():
        logp, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, TRL_CHUNK_TOKENS, None,
                                                         1.0, outputs)
        if op == "ce":
            return -logp.mean()
        return (logp, entropy) if op == "logprobs_entropy" else logp
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
    return None
