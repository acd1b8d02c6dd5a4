"""``logit_scale``: a constant multiplier of the logits before the softcap (Cohere, Granite, and TRL's
order), against float64 logits computed as ``softcap * tanh(scale * s / softcap) / temperature``."""
import pytest
import torch
from helpers.cases import assert_close, assert_grads_close

from osft_kernels import linear_cross_entropy, linear_logprobs


def reference(hidden, weight, bias, targets, scale, softcap, temperature):
    z = (hidden.double() @ weight.double().T + bias.double()) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / (temperature.double()[:, None] if isinstance(temperature, torch.Tensor) else temperature)
    logp = torch.log_softmax(z, -1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("temperature", ["float", "rows"])
def test_logit_scale_matches_float64(backend, softcap, temperature):
    if backend == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=gen, requires_grad=True)
    weight = torch.randn(3000, 16, generator=gen, requires_grad=True)
    bias = torch.randn(3000, generator=gen, requires_grad=True)
    targets = torch.randint(0, 3000, (11,), generator=gen)
    temp = 0.8 if temperature == "float" else torch.rand(11, generator=gen) + 0.5
    scale = 0.0625  # Cohere's
    out = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temp, softcap=softcap, logit_scale=scale,
                          return_entropy=True, backend=backend)
    params = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    logp, entropy = reference(*params, targets, scale, softcap, temp)
    assert_close(out.logprobs, logp, rtol=1e-5, atol_rel=1e-5, what="logprobs")
    assert_close(out.entropy, entropy, rtol=1e-5, atol_rel=1e-5, what="entropy")
    up = torch.linspace(-1, 1, 11)
    ours = torch.autograd.grad((out.logprobs * up).sum() + out.entropy.sum(), [hidden, weight, bias])
    expected = torch.autograd.grad((logp * up).sum() + entropy.sum(), params)
    assert_grads_close(ours, expected, torch.float32, "logit_scale")
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, temperature=temp, softcap=softcap,
                                logit_scale=scale, backend=backend)
    assert_close(loss, -logp.mean(), rtol=1e-5, atol_rel=1e-5, what="cross-entropy")


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), "1"])
def test_bad_logit_scale_is_named(value):
    hidden, weight, targets = torch.randn(3, 8), torch.randn(20, 8), torch.randint(0, 20, (3,))
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        linear_logprobs(hidden, weight, targets, logit_scale=value)
