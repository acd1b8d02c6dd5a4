"""``linear_token_outputs``: the per-token metrics trainers log (mean logit, whether the target is the most
likely token, ``log sum_j p_j^2``) from the same pass as the logprobs, against float64 on every backend."""
import pytest
import torch
from helpers.cases import assert_close

from osft_kernels import TokenOutputs, linear_logprobs, linear_token_outputs

ALL = ("logprobs", "entropy", "mean_logit", "is_top1", "log_sum_sq_probs")
# (backend, memory_budget): the chunked driver with one and with several vocabulary chunks, the fused forward
BACKENDS = [("reference", None), ("torch", None), ("torch", 3 * 4 * 16 * 2048 * 2), ("triton", None), ("triton", 0),
            ("cpu", None), ("cpu", 6 * 128 * 2048 * 2)]
IDS = ["reference", "torch", "torch-vocab-chunks", "triton", "triton-fused-forward", "cpu", "cpu-vocab-chunks"]


def case(dtype, v=5000, seed=0):
    """Rows whose targets are the float64 argmax for half of them, random for the rest; shift, ignored
    tokens, per-sequence temperature, softcap and a bias with a masked (-inf) block."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 13, 24, generator=gen)
    weight = torch.randn(v, 24, generator=gen) / 3
    bias = torch.randn(v, generator=gen)
    bias[2048:4096] = -float("inf")
    temperature = torch.rand(2, 1, generator=gen) + 0.5
    kwargs = dict(bias=bias.to(dtype), temperature=temperature, softcap=8.0, shift=True)
    z = reference_logits(hidden.to(dtype).double(), weight.to(dtype).double(), bias.to(dtype).double(), temperature,
                         8.0)
    targets = torch.randint(0, v, (2, 13), generator=gen)
    targets[:, 1::2] = z.argmax(-1)[:, ::2][:, :targets[:, 1::2].shape[1]]
    targets[0, 4] = -100
    return hidden.to(dtype), weight.to(dtype), targets, kwargs, z


def reference_logits(hidden, weight, bias, temperature, softcap):
    """Float64 ``z`` of every position predicting the next token, ``[2, 12, V]``."""
    s = hidden[:, :-1] @ weight.T + bias
    return softcap * torch.tanh(s / softcap) / temperature[..., None]


@pytest.mark.parametrize("backend,memory_budget", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_outputs_match_float64(backend, memory_budget, dtype):
    if backend == "triton":
        pytest.importorskip("triton")
    hidden, weight, targets, kwargs, z = case(dtype)
    with torch.no_grad():
        out = linear_token_outputs(hidden, weight, targets, outputs=ALL, backend=backend, memory_budget=memory_budget,
                                   **kwargs)
    y = targets[:, 1:]
    valid = y != -100
    logp = torch.log_softmax(z, -1)
    finite = torch.isfinite(z)
    expected = {
        "logprobs": logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1),
        "entropy": -(logp.exp() * logp.clamp(min=-1e4)).sum(-1),
        "mean_logit": z.mean(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * logp, -1),
    }
    for name, value in expected.items():
        ours = getattr(out, name)
        assert ours.dtype == torch.float32 and ours.shape == y.shape, name
        assert bool((ours[~valid] == 0).all()), name
        assert_close(ours[valid], value[valid], rtol=1e-5, atol_rel=1e-5, what=name)
    top2 = torch.where(finite, z, -torch.inf).topk(2, -1).values
    clear = valid & (top2[..., 0] - top2[..., 1] > 1e-3)  # no near-tie that float32 rounding could flip
    top1 = z.argmax(-1) == y
    assert out.is_top1.dtype == torch.bool and not bool(out.is_top1[~valid].any())
    assert torch.equal(out.is_top1[clear], top1[clear])
    assert bool(top1[clear].any()) and bool((~top1[clear]).any())


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_logprobs_and_entropy_keep_their_gradients(backend):
    """The metrics come from the same pass and carry no gradient; logprobs and entropy are those of
    linear_logprobs, gradients included."""
    if backend == "triton":
        pytest.importorskip("triton")
    hidden, weight, targets, kwargs, _ = case(torch.float32, v=700)
    hidden.requires_grad_()
    out = linear_token_outputs(hidden, weight, targets, outputs=ALL, backend=backend, **kwargs)
    plain = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend, **kwargs)
    assert torch.equal(out.logprobs, plain.logprobs) and torch.equal(out.entropy, plain.entropy)
    assert not (out.mean_logit.requires_grad or out.log_sum_sq_probs.requires_grad)
    ours = torch.autograd.grad((out.logprobs * 0.5 + out.entropy).sum(), hidden)[0]
    expected = torch.autograd.grad((plain.logprobs * 0.5 + plain.entropy).sum(), hidden)[0]
    assert torch.equal(ours, expected)


def test_only_requested_outputs_are_returned():
    hidden, weight, targets, kwargs, _ = case(torch.float32, v=300)
    out = linear_token_outputs(hidden, weight, targets, outputs=("is_top1",), **kwargs)
    assert isinstance(out, TokenOutputs) and out.logprobs is not None and out.is_top1 is not None
    assert out.entropy is None and out.mean_logit is None and out.log_sum_sq_probs is None
    with pytest.raises(ValueError, match=r"outputs must name only .*got \['logits'\]"):
        linear_token_outputs(hidden, weight, targets, outputs=("logprobs", "logits"))
    with pytest.raises(TypeError, match="outputs must be a tuple of names"):
        linear_token_outputs(hidden, weight, targets, outputs="entropy")


def test_token_outputs_under_torch_compile():
    hidden, weight, targets, kwargs, _ = case(torch.float32, v=700)
    step = lambda h, w, t, temp: linear_token_outputs(h, w, t, outputs=ALL, **{**kwargs, "temperature": temp})
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(hidden, weight, targets, kwargs["temperature"])
    eager = step(hidden, weight, targets, kwargs["temperature"])
    for name in ALL:
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
