"""Independent float64 implementation of the public API's definitions, written from the formulas with
materialized logits and plain autograd. It shares no code with the package."""
import torch


def shifted(hidden, targets, temperature, shift):
    """Apply the causal shift: position t is paired with target t+1, the last position is dropped."""
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.expand(targets.shape)
    if not shift:
        return hidden, targets, temperature
    if isinstance(temperature, torch.Tensor):
        temperature = temperature[..., :-1]
    return hidden[..., :-1, :], targets[..., 1:], temperature


def reference(hidden, weight, targets, *, bias=None, token_weights=None, temperature=1.0, softcap=None,
              label_smoothing=0.0, z_loss=0.0, ignore_index=-100, shift=False):
    """Per-token float64 ``logprobs``, ``entropy``, ``loss`` (reduction none) and ``mean``/``sum`` losses;
    ``token_weights`` are per target (shaped like the outputs)."""
    h, y, temp = shifted(hidden.double(), targets,
                         temperature.double() if isinstance(temperature, torch.Tensor) else temperature, shift)
    w = None if token_weights is None else token_weights.double()
    s = h @ weight.double().T
    if bias is not None:
        s = s + bias.double()
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    z = s / (temp.unsqueeze(-1) if isinstance(temp, torch.Tensor) else temp)
    valid = y != ignore_index
    safe_y = torch.where(valid, y, 0)
    logp = torch.log_softmax(z, dim=-1)
    target_logp = logp.gather(-1, safe_y.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    lse = torch.logsumexp(z, dim=-1)
    loss = ((1 - label_smoothing) * -target_logp + label_smoothing * (lse - z.mean(-1))
            + z_loss * lse ** 2)
    if w is not None:
        loss = loss * w
    zero = torch.zeros((), dtype=torch.float64)
    loss = torch.where(valid, loss, zero)
    count = int(valid.sum())
    return {
        "logprobs": torch.where(valid, target_logp, zero),
        "entropy": torch.where(valid, entropy, zero),
        "none": loss,
        "sum": loss.sum(),
        "mean": loss.sum() / max(count, 1),
    }
