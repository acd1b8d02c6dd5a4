"""``torch.compile(fullgraph=True)`` of a training step that calls the fused ops: no graph breaks, the
same outputs and gradients as eager, and the same argument errors. The ops reach the compiler as
``torch.library`` custom ops (``osft_kernels/custom_ops.py``)."""
import pytest
import torch

from osft_kernels import linear_cross_entropy, linear_logprobs

BACKENDS = ["torch", "reference", "triton", "cpu"]


def case(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(300, 16, generator=gen) / 4).to(dtype).requires_grad_()
    bias = torch.randn(300, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (3, 11), generator=gen)
    targets[0, :4] = -100
    targets[2] = -100
    temperature = torch.rand(3, 1, generator=gen) + 0.5
    token_weights = torch.rand(3, 10, generator=gen)  # per shifted target
    return hidden, weight, bias, targets, temperature, token_weights


def step(hidden, weight, bias, targets, temperature, token_weights, backend):
    """Every compiled path: logprobs with entropy, and cross-entropy with each reduction."""
    out = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True,
                          shift=True, backend=backend)
    mean = linear_cross_entropy(hidden, weight, targets, bias=bias, token_weights=token_weights, label_smoothing=0.1,
                                z_loss=1e-3, softcap=3.0, shift=True, backend=backend)
    total = linear_cross_entropy(hidden, weight, targets, temperature=0.7, reduction="sum", backend=backend)
    per_token = linear_cross_entropy(hidden, weight, targets, reduction="none", backend=backend)
    loss = ((out.logprobs * 0.3).sum() + (out.entropy * 0.2).sum() + mean + 0.01 * total
            + (per_token * torch.linspace(0, 1, 11)).sum())
    return loss, out.logprobs, out.entropy, mean, total, per_token


def run(fn, dtype, backend):
    inputs = case(dtype)
    outputs = fn(*inputs, backend)
    grads = torch.autograd.grad(outputs[0], inputs[:3])
    return outputs, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_step_equals_eager(backend, dtype):
    """aot_eager traces exactly what inductor gets; per-token outputs are bitwise equal, the reduced losses
    and the gradients (a different summation order in the mean) within float32 rounding."""
    if backend == "triton":
        pytest.importorskip("triton")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (eager_out, eager_grads), (ours, grads) = run(step, dtype, backend), run(compiled, dtype, backend)
    for name, a, b in zip(("logprobs", "entropy"), ours[1:3], eager_out[1:3]):
        assert torch.equal(a, b), name
    for name, a, b in zip(("loss", "mean", "sum", "none"), ours[:1] + ours[3:], eager_out[:1] + eager_out[3:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2 ** -7, "atol": 1e-3}
    for name, a, b in zip(("hidden", "weight", "bias"), grads, eager_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **tolerance, msg=f"d{name}")


def test_inductor_compiles_the_step():
    """The default compiler too (C++ code generation on CPU), on the torch backend."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    (eager_out, eager_grads), (ours, grads) = run(step, torch.float32, "torch"), run(compiled, torch.float32, "torch")
    torch.testing.assert_close(ours[0], eager_out[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_argument_errors_survive_compilation():
    """Checks that read tensor values run inside the ops, with the eager messages."""
    torch._dynamo.reset()
    hidden, weight, bias, targets, temperature, token_weights = case()
    compiled = torch.compile(lambda h, w, t: linear_logprobs(h, w, t).logprobs, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"targets must be in \[0, V\) = \[0, 300\)"):
        compiled(hidden, weight, torch.where(targets == 5, 300, targets).index_fill(1, torch.tensor([1]), 300))
    with pytest.raises(ValueError, match="temperature tensor must contain only finite values > 0"):
        torch.compile(lambda h, w, t, temp: linear_logprobs(h, w, t, temperature=temp).logprobs, fullgraph=True,
                      backend="aot_eager")(hidden, weight, targets, temperature * 0)
