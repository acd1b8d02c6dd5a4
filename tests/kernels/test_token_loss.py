"""``linear_token_loss``: a sum of per-token losses of logprob and entropy with the gradients formed in
the forward pass, against the same loss written on ``linear_logprobs`` of the float64 reference."""
import importlib.util
import os

import pytest
import torch
from helpers.cases import FEATURES, assert_close, assert_grads_close, bf16_grad_tolerance, make_case, out_shape
from helpers.reference64 import reference

from osft_kernels import linear_token_loss
from osft_kernels.driver import ROW_ALIGN, VOCAB_BLOCK

BACKENDS = {"torch": {"backend": "torch"},
            "torch-small-chunks": {"backend": "torch", "memory_budget": 12 * ROW_ALIGN * VOCAB_BLOCK},
            "cpu": {"backend": "cpu"}}
if importlib.util.find_spec("triton") and os.environ.get("TRITON_INTERPRET") == "1":
    BACKENDS["triton"] = {"backend": "triton"}


def per_token_loss(case):
    """A loss that uses each token's logprob, entropy and two per-token values fixed before the call."""
    shape = out_shape(case)
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(shape, generator=gen), torch.rand(shape, generator=gen)

    def of_values(logprobs, entropy, a=a, b=b):
        return a * logprobs.exp() + b * logprobs ** 2 - 0.3 * a * entropy

    def token_loss(logprobs, entropy, index):
        return of_values(logprobs, entropy, a.reshape(-1)[index], b.reshape(-1)[index])

    return token_loss, of_values


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("feature", ["plain", "ignored", "shift", "everything", "all-ignored"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_the_loss_on_reference_logprobs(dtype, feature, backend):
    case = make_case((3, 29), 24, 2 * VOCAB_BLOCK + 77, dtype, FEATURES[feature])
    kwargs = dict(case["kwargs"])
    token_loss, of_values = per_token_loss(case)
    loss, out = linear_token_loss(case["hidden"], case["weight"], case["targets"], token_loss, return_entropy=True,
                                  **kwargs, **BACKENDS[backend])
    # the small budget holds too few full rows: statistics, then the recomputing backward
    path = "SumBackward0" if backend == "torch-small-chunks" else "SummedLossFunctionBackward"
    assert type(loss.grad_fn).__name__ == path
    ref_params = [p.detach().double().requires_grad_() for p in (case["hidden"], case["weight"],
                                                                  *([kwargs["bias"]] if "bias" in kwargs else []))]
    ref = reference(ref_params[0], ref_params[1], case["targets"], bias=ref_params[2] if len(ref_params) > 2 else None,
                    **{k: v for k, v in kwargs.items() if k != "bias"})
    targets = case["targets"][..., 1:] if kwargs.get("shift") else case["targets"]
    valid = targets != -100
    expected = torch.where(valid, of_values(ref["logprobs"], ref["entropy"]), 0.0).sum()
    assert_close(loss, expected, rtol=1e-5, atol_rel=1e-5, what="loss")
    assert_close(out.logprobs, ref["logprobs"], rtol=1e-5, atol_rel=1e-5, what="logprobs")
    assert_close(out.entropy, ref["entropy"], rtol=1e-5, atol_rel=1e-5, what="entropy")
    assert not out.logprobs.requires_grad
    params = [case["hidden"], case["weight"]] + ([kwargs["bias"]] if "bias" in kwargs else [])
    ours = torch.autograd.grad(loss * 0.5, params, allow_unused=True)
    if feature == "all-ignored":
        assert all(g is None or not g.any() for g in ours)
        return
    assert_grads_close(ours, torch.autograd.grad(expected * 0.5, ref_params), dtype, "token loss",
                       bf16_grad_tolerance(backend, case["hidden"].shape[-1]))


def test_without_gradients_gives_the_same_values():
    case = make_case((2, 33), 16, 3001, torch.float32, FEATURES["shift"])
    token_loss, _ = per_token_loss(case)
    args = (case["hidden"], case["weight"], case["targets"], token_loss)
    trained, out = linear_token_loss(*args, return_entropy=True, **case["kwargs"])
    with torch.no_grad():
        scored, scored_out = linear_token_loss(*args, return_entropy=True, **case["kwargs"])
    torch.testing.assert_close(scored, trained.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(scored_out.logprobs, out.logprobs)


def test_token_loss_must_be_callable():
    case = make_case((4,), 8, 10, torch.float32, FEATURES["plain"])
    with pytest.raises(TypeError, match="token_loss must be callable"):
        linear_token_loss(case["hidden"], case["weight"], case["targets"], 1.0)
