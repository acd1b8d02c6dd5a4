"""Peak extra memory of forward + backward, measured with the live-storage tracker."""
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.backends.cpu import available as cpu_backend_available
from osft_kernels.driver import DEFAULT_MEMORY_BUDGET
from osft_kernels.memory import MIB, PeakMemory

N, D, V = 4096, 64, 32000
LOGITS_MIB = N * V * 4 / MIB  # 500 MiB: what one fp32 copy of the logits would cost


def test_tracker_counts_new_storages_only():
    outside = torch.zeros(1000, 1000)
    with PeakMemory() as mem:
        a = torch.zeros(256, 1024)  # 1 MiB
        view = a[:10].t()
        outside.add_(1.0)
        b = a + 1  # 1 MiB more
        del a, view, b
        c = torch.zeros(128, 1024)  # 0.5 MiB, after the others were freed
        del c
    assert mem.peak_bytes == 2 * MIB


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)
    weight = (torch.randn(V, D, generator=gen) / 8).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    return hidden, weight, targets


def cross_entropy_step(hidden, weight, targets, budget):
    linear_cross_entropy(hidden, weight, targets, memory_budget=budget).backward()


def logprobs_step(hidden, weight, targets, budget):
    out = linear_logprobs(hidden, weight, targets, return_entropy=True, memory_budget=budget)
    (out.logprobs.sum() - 0.5 * out.entropy.sum()).backward()


@pytest.mark.parametrize("budget", [None, 16 * MIB])
@pytest.mark.parametrize("step", [cross_entropy_step, logprobs_step])
def test_peak_memory_is_bounded_by_budget(problem, step, budget):
    hidden, weight, targets = problem
    hidden.grad = weight.grad = None
    with PeakMemory() as mem:
        step(hidden, weight, targets, budget)
    budget_mib = (budget or DEFAULT_MEMORY_BUDGET["cpu"]) / MIB
    grads_mib = (N + V) * D * 4 / MIB  # d_hidden and the float32 d_weight accumulator
    bound = budget_mib + grads_mib + 2  # + O(N) statistics and one padded chunk copy
    print(f"{step.__name__} budget={budget_mib:.0f} MiB: peak {mem.peak_mib:.1f} MiB (bound {bound:.1f}, "
          f"full logits {LOGITS_MIB:.0f})")
    assert mem.peak_mib <= bound
    assert mem.peak_mib < LOGITS_MIB / 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_no_copy_of_the_hidden_rows(dtype, backend):
    """With ``shift`` and ignored tokens the computed rows are a subset of ``hidden``: forward keeps no
    ``[n, D]`` copy of them for backward, and backward writes ``hidden``'s gradient once."""
    if backend == "cpu" and not cpu_backend_available():
        pytest.skip("the C++ extension is not built")
    batch, seq, dim, vocab = 4, 1024, 256, 4096
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / 16).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    targets[:, :seq // 2] = -100  # the prompt half
    n = int((targets[:, 1:] != -100).sum())
    row_bytes = dim * hidden.element_size()
    budget = 2 * MIB
    with PeakMemory() as mem:
        out = linear_logprobs(hidden, weight, targets, shift=True, backend=backend, memory_budget=budget)
        kept = mem.current_bytes
        out.logprobs.sum().backward()
    # kept: the logprobs grid, [n, NUM_STATS] statistics and the int64 row indices
    assert kept < n * row_bytes / 4, f"{kept / MIB:.2f} MiB kept from forward to backward"
    # backward: the float32 gradient of the n rows, hidden's gradient, one chunk, and per weight entry a
    # float32 GEMM operand copy (bf16 weights on the torch backend), a float32 accumulator and the gradient
    bound = n * dim * 4 + hidden.numel() * hidden.element_size() + vocab * dim * (8 + weight.element_size()) + budget
    assert mem.peak_bytes <= bound + MIB, f"peak {mem.peak_mib:.2f} MiB, bound {bound / MIB:.2f} MiB"
    hidden64 = hidden.detach().double().requires_grad_()
    out64 = linear_logprobs(hidden64, weight.detach().double(), targets, shift=True, backend="reference")
    out64.logprobs.sum().backward()
    atol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the rounding of d_hidden and of the products
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=0, atol=atol)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backward_releases_hidden_while_the_graph_lives(backend):
    """The chunked backends keep the caller's ``hidden`` for the recomputing backward; once that has run,
    nothing holds it alive, even while the graph (the outputs) still exists: the rest of the model's
    backward runs without it."""
    if backend == "cpu" and not cpu_backend_available():
        pytest.skip("the C++ extension is not built")
    leaf = torch.randn(3, 40, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    targets = torch.randint(0, 50, (3, 40))
    targets[:, :10] = -100
    hidden = leaf * 2.0  # an activation: its multiplication keeps no copy of it
    storage = StorageWeakRef(hidden.untyped_storage())
    out = linear_logprobs(hidden, weight, targets, shift=True, backend=backend, memory_budget=None)
    del hidden
    assert not storage.expired()  # kept for backward
    out.logprobs.sum().backward()
    assert storage.expired()
    assert out.logprobs.grad_fn is not None and leaf.grad is not None
