"""torch.autograd.gradcheck in float64: analytic gradients of every output against finite differences."""
import pytest
import torch

from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.driver import ROW_ALIGN, VOCAB_BLOCK

BACKENDS = {"reference": {"backend": "reference"}, "torch": {"backend": "torch"},
            "torch-vocab-chunks": {"backend": "torch", "memory_budget": 3 * 8 * ROW_ALIGN * VOCAB_BLOCK},
            "cpu": {"backend": "cpu"},
            "cpu-vocab-chunks": {"backend": "cpu", "memory_budget": 8 * ROW_ALIGN * VOCAB_BLOCK}}


def inputs(lead, d, v, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    hidden = torch.randn(*lead, d, generator=gen, **f64).requires_grad_()
    weight = torch.randn(v, d, generator=gen, **f64).requires_grad_()
    bias = torch.randn(v, generator=gen, **f64).requires_grad_()
    targets = torch.randint(0, v, lead, generator=gen)
    targets.view(-1)[1] = -100
    temperature = torch.rand(*lead[:-1], 1, generator=gen, **f64) + 0.5
    token_weights = torch.rand(lead, generator=gen, **f64)
    return hidden, weight, bias, targets, temperature, token_weights


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_logprobs_and_entropy_gradcheck(backend, softcap):
    v = 7 if backend != "torch-vocab-chunks" else VOCAB_BLOCK + 3
    hidden, weight, bias, targets, temperature, _ = inputs((2, 4), 3, v)

    def f(h, w, b):
        out = linear_logprobs(h, w, targets, bias=b, temperature=temperature, softcap=softcap, shift=True,
                              return_entropy=True, **BACKENDS[backend])
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), fast_mode=v > 100)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_cross_entropy_gradcheck(backend, reduction):
    v = 7 if backend != "torch-vocab-chunks" else VOCAB_BLOCK + 3
    hidden, weight, bias, targets, temperature, token_weights = inputs((2, 4), 3, v, seed=1)

    def f(h, w, b):
        return linear_cross_entropy(h, w, targets, bias=b, token_weights=token_weights, temperature=temperature,
                                    softcap=3.0,
                                    label_smoothing=0.1, z_loss=0.01, reduction=reduction, **BACKENDS[backend])

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), fast_mode=v > 100)
