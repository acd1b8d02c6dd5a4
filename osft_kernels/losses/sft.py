"""Token-weighted SFT, which is also the OSFT objective, and OSFT's sampling-temperature schedule.

OSFT (online SFT, arXiv 2510.18814) fine-tunes the model on its own responses, sampled at a low
temperature ``tau_s`` and trained at ``tau_t`` (default 1) by dividing the logits by ``tau_t``
before the log-softmax. With ``tau_s == tau_t`` the expected gradient is zero (the score-function
identity ``E_{y ~ p}[grad log p(y)] = 0``); with ``tau_s < tau_t`` the expected per-token logit
gradient ``(softmax(z / tau_t) - softmax(z / tau_s)) / tau_t`` sharpens the distribution, pushing
every logit margin toward ``tau_t / tau_s`` times its old value.
"""

from torch import Tensor

from .. import checks, token_rows
from ..api import linear_cross_entropy
from .aggregation import NORMALIZATIONS, aggregation_weights


def sft_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *, token_weights: Tensor | None = None,
             temperature: float | Tensor = 1.0, ignore_index: int = -100, normalize: str | float = "tokens",
             num_items: float | None = None, bias: Tensor | None = None, softcap: float | None = None,
             shift: bool = False, backend: str = "auto", weights: Tensor | None = None,
             **kernel_options) -> Tensor:
    """``sum_{i,t} c_{i,t} * token_weights_{i,t} * -log softmax(z_{i,t} / temperature)[y_{i,t}]``.

    The token-weighted SFT loss; OSFT with ``temperature = tau_t`` on sampled responses, PEAR with
    ``token_weights = pear_weights(...)``. One fused cross-entropy call: the normalization ``c`` is folded
    into the per-token weights, so no ``[N, V]`` tensor and no second pass.

    Args:
        hidden: ``[..., T, D]`` (or ``[N, D]``); weight ``[V, D]``; targets integer ``[..., T]``.
        token_weights: per-target loss weights (detached), e.g. importance weights, shaped like the
            per-token outputs (``targets[..., 1:]`` with ``shift``). ``weights``: its deprecated
            alias, shaped like ``targets``.
        normalize: ``"tokens"`` (mean over non-ignored tokens), ``"sequences"`` (mean over sequences
            of each sequence's token mean; the last dimension of ``targets`` is the sequence), or a
            number (the sum divided by that constant).
        num_items: the global token (``"tokens"``) or sequence (``"sequences"``) count of the whole
            accumulated batch; summing micro-batch losses then reproduces the full-batch gradient.
        temperature, ignore_index, bias, softcap, shift, backend, **kernel_options: as in
            :func:`osft_kernels.linear_cross_entropy`.

    Returns a float32 scalar (0 with zero gradients when every token is ignored).
    """
    token_weights = checks.renamed_weights(weights, token_weights, targets, shift, stacklevel=2)
    mask = token_rows.target_mask(targets, ignore_index, shift)
    if isinstance(normalize, str):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be 'tokens', 'sequences' or a number > 0, got {normalize!r}")
        coef = aggregation_weights(mask, NORMALIZATIONS[normalize], num_items=num_items)
    else:
        if not checks.is_finite_number(normalize) or normalize <= 0:
            raise ValueError(f"normalize must be 'tokens', 'sequences' or a number > 0, got {normalize!r}")
        if num_items is not None:
            raise ValueError("num_items applies to normalize='tokens' or 'sequences', not to a constant")
        coef = aggregation_weights(mask, "constant", norm_length=normalize)
    if token_weights is not None:
        checks.check_token_weights(token_weights, token_rows.target_shape(targets, shift), shift, targets.device)
        coef = coef * token_weights.detach().to(coef.device, coef.dtype)
    return linear_cross_entropy(hidden, weight, targets, token_weights=coef, temperature=temperature,
                                ignore_index=ignore_index, reduction="sum", bias=bias, softcap=softcap, shift=shift,
                                backend=backend, **kernel_options)


def sampling_temperature(epoch: float, *, start: float = 0.6, end: float = 1.0, anneal_epochs: float = 2.0) -> float:
    """OSFT's sampling temperature ``tau_s`` after ``epoch`` epochs of training (a float: step / steps per epoch).

    Linear from ``start`` to ``end`` over the first ``anneal_epochs`` epochs, then ``end`` (the
    paper's v2: ``start`` 0.6 for math models, 0.9 for general ones, ``end`` 1.0, 2 of 3 epochs).
    ``end=start`` gives a constant (v1: 0.6 throughout).
    """
    for name, value in (("epoch", epoch), ("start", start), ("end", end), ("anneal_epochs", anneal_epochs)):
        if not checks.is_finite_number(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch!r}")
    if anneal_epochs <= 0:
        raise ValueError(f"anneal_epochs must be > 0, got {anneal_epochs!r}")
    if start <= 0 or end <= 0:
        raise ValueError(f"start and end temperatures must be > 0, got {start!r} and {end!r}")
    progress = min(epoch / anneal_epochs, 1.0)
    return float(start + (end - start) * progress)
