"""Every bad argument raises TypeError/ValueError naming the argument and what was expected."""
import subprocess
import sys

import pytest
import torch

from osft_kernels import linear_cross_entropy, linear_logprobs

H = torch.randn(2, 3, 8)
W = torch.randn(11, 8)
T = torch.randint(0, 11, (2, 3))


def both(**overrides):
    """Call both public functions with the good arguments, replaced by ``overrides``."""
    args = {"hidden": H, "weight": W, "targets": T, **overrides}
    positional = [args.pop(k) for k in ("hidden", "weight", "targets")]
    return [lambda: linear_logprobs(*positional, **args), lambda: linear_cross_entropy(*positional, **args)]


CASES = [
    ({"hidden": H.numpy()}, TypeError, "hidden must be a torch.Tensor"),
    ({"hidden": H.long()}, TypeError, "hidden must be float32, bfloat16, float16 or float64"),
    ({"hidden": torch.tensor(1.0), "targets": torch.tensor(1)}, ValueError, "hidden must have shape"),
    ({"weight": W[None]}, ValueError, r"weight must have shape \[V, D\]"),
    ({"weight": torch.randn(11, 7)}, ValueError, r"weight must have shape \[V, D\] with D = hidden.shape\[-1\] = 8"),
    ({"weight": torch.randn(0, 8)}, ValueError, "weight must have at least one row"),
    ({"weight": W.double()}, TypeError, "weight must have the dtype of hidden"),
    ({"bias": torch.randn(10)}, ValueError, r"bias must have shape \[V\] = \[11\]"),
    ({"bias": torch.randn(11).double()}, TypeError, "bias must have the dtype of weight"),
    ({"targets": T.float()}, TypeError, "targets must be an integer tensor"),
    ({"targets": T.bool()}, TypeError, "targets must be an integer tensor"),
    ({"targets": T[0]}, ValueError, r"targets must have shape hidden.shape\[:-1\] = \(2, 3\)"),
    ({"targets": torch.where(T == T[1, 2], 11, T)}, ValueError, r"targets must be in \[0, V\) = \[0, 11\).*found 11"),
    ({"targets": torch.full((2, 3), -1)}, ValueError, r"found -1 at position \(0, 0\)"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": -1.0}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": float("nan")}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": float("inf")}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": "hot"}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": torch.ones(3, 2)}, ValueError, r"temperature tensor must be broadcastable to targets.shape"),
    ({"temperature": torch.ones(2, 1, dtype=torch.long)}, TypeError, "temperature tensor must be floating point"),
    ({"temperature": torch.tensor([[1.0], [0.0]])}, ValueError, "temperature tensor must contain only finite values > 0"),
    ({"temperature": torch.tensor([[1.0], [float("nan")]])}, ValueError, "finite values > 0"),
    ({"softcap": 0.0}, ValueError, "softcap must be None or a finite number > 0"),
    ({"softcap": -3.0}, ValueError, "softcap must be None or a finite number > 0"),
    ({"shift": 1}, TypeError, "shift must be a bool"),
    ({"backend": "nope"}, ValueError, r"backend must be one of \['auto', 'reference', 'torch', 'triton'"),
    ({"backend": "cuda"}, ValueError, "backend='cuda' needs CUDA tensors, got cpu tensors"),
    ({"memory_budget": 100}, ValueError, "memory_budget must be None or an int of at least"),
    ({"memory_budget": 2.0**30}, ValueError, "memory_budget must be None or an int"),
]


@pytest.mark.parametrize("overrides,error,message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_arguments(overrides, error, message):
    for call in both(**overrides):
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("overrides,error,message", [
    ({"label_smoothing": 1.0}, ValueError, r"label_smoothing must be a float in \[0, 1\)"),
    ({"label_smoothing": -0.1}, ValueError, r"label_smoothing must be a float in \[0, 1\)"),
    ({"z_loss": -1e-4}, ValueError, "z_loss must be a finite float >= 0"),
    ({"z_loss": float("inf")}, ValueError, "z_loss must be a finite float >= 0"),
    ({"reduction": "avg"}, ValueError, r"reduction must be one of \('none', 'sum', 'mean'\)"),
    ({"token_weights": torch.ones(2, 3, dtype=torch.long)}, TypeError, "token_weights must be a floating point"),
    ({"token_weights": torch.ones(3, 2)}, ValueError,
     r"token_weights must have the shape of the per-token outputs \(2, 3\) \(targets\)"),
    ({"token_weights": torch.ones(2, 3), "shift": True}, ValueError,
     r"token_weights must have the shape of the per-token outputs \(2, 2\) \(targets\[..., 1:\] with shift=True\)"),
    ({"token_weights": torch.tensor([[1.0, float("nan"), 1.0]] * 2)}, ValueError, "token_weights must be finite"),
    ({"token_weights": torch.ones(2, 3), "weights": torch.ones(2, 3)}, TypeError,
     "pass token_weights only: weights is its deprecated alias"),
])
def test_bad_cross_entropy_arguments(overrides, error, message):
    with pytest.raises(error, match=message):
        linear_cross_entropy(H, W, T, **overrides)


@pytest.mark.parametrize("shift", [False, True])
def test_deprecated_weights_are_shaped_like_targets(shift):
    """``weights`` (the old name) keeps its old coordinates: the shape of ``targets`` whatever ``shift``."""
    weights = torch.rand(2, 3, generator=torch.Generator().manual_seed(0))
    token_weights = weights[..., 1:] if shift else weights
    for reduction in ("none", "sum"):
        expected = linear_cross_entropy(H, W, T, token_weights=token_weights, shift=shift, reduction=reduction)
        with pytest.warns(DeprecationWarning, match=r"weights= is deprecated: pass token_weights="):
            loss = linear_cross_entropy(H, W, T, weights=weights, shift=shift, reduction=reduction)
        assert torch.equal(loss, expected)
    with pytest.raises(ValueError, match=r"weights \(deprecated\) must have the shape of targets \(2, 3\)"):
        with pytest.warns(DeprecationWarning):
            linear_cross_entropy(H, W, T, weights=token_weights[..., 1:], shift=shift)


def test_bad_return_entropy():
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        linear_logprobs(H, W, T, return_entropy="yes")


def test_shift_needs_a_dimension():
    with pytest.raises(ValueError, match="shift=True needs targets with at least one dimension"):
        linear_logprobs(torch.randn(8), W, torch.tensor(3), shift=True)


def test_ignore_index_inside_vocabulary_is_ignored():
    """As in torch.nn.functional.cross_entropy, ignore_index may be a real class id (e.g. padding)."""
    out = linear_logprobs(H, W, T, ignore_index=int(T[0, 0]))
    assert out.logprobs[0, 0] == 0.0
    assert (out.logprobs[T != T[0, 0]] < 0).all()


def test_mixed_devices_are_rejected():
    meta = torch.randn(11, 8, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        linear_logprobs(H, meta, T)
    with pytest.raises(ValueError, match="targets is on meta but hidden is on cpu"):
        linear_logprobs(H, W, T.to("meta"))
    with pytest.raises(ValueError, match="token_weights is on meta but hidden is on cpu"):
        linear_cross_entropy(H, W, T, token_weights=torch.ones(2, 3, device="meta"))


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr("osft_kernels.triton_kernels.configs.INTERPRETING", False)
    for call in both(backend="triton"):
        with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors, got cpu tensors"):
            call()


def test_triton_backend_without_triton_installed(monkeypatch):
    monkeypatch.setattr("osft_kernels.backends.triton_installed", lambda: False)
    for call in both(backend="triton"):
        with pytest.raises(ValueError, match="backend 'triton' needs the triton package: pip install triton"):
            call()


def test_package_works_without_triton():
    """Importing and using osft_kernels on CPU never imports triton, and works when it is absent."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, osft_kernels\n"
        "h, w = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8)\n"
        "osft_kernels.linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4])).backward()\n"
        "try:\n"
        "    osft_kernels.linear_logprobs(h, w, torch.tensor([1, 2, 3, 4]), backend='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backend 'triton' needs the triton package" in result.stdout
