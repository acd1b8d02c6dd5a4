"""Batch and chunk-size invariance of the chunked backend: a token's logprob, entropy and loss are
bitwise the same whatever other rows share the batch, where the token sits, and how the batch is
cut into token and vocabulary chunks."""
import pytest
import torch

from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.backends import cpu
from osft_kernels.driver import ROW_ALIGN, VOCAB_BLOCK

V, D = 2 * VOCAB_BLOCK + 907, 64
CPU_TILE = cpu.extension()[1]
# default; a few rows x full vocabulary; one row alignment x one vocabulary block per chunk
BUDGETS = {"torch": [None, 3 * 4 * 32 * V, 3 * 4 * ROW_ALIGN * VOCAB_BLOCK],
           "cpu": [None, 6 * CPU_TILE * V, 6 * CPU_TILE * VOCAB_BLOCK]}


def per_token(hidden, weight, targets, temperature, budget, backend, **kwargs):
    common = dict(bias=kwargs["bias"], temperature=temperature, softcap=4.0, backend=backend, memory_budget=budget)
    out = linear_logprobs(hidden, weight, targets, return_entropy=True, **common)
    loss = linear_cross_entropy(hidden, weight, targets, reduction="none", label_smoothing=0.1, z_loss=1e-3, **common)
    return out.logprobs, out.entropy, loss


@pytest.mark.parametrize("backend", list(BUDGETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_results_do_not_depend_on_batch_or_chunking(dtype, backend):
    gen = torch.Generator().manual_seed(0)
    n, n_other = 45, 100
    weight = (torch.randn(V, D, generator=gen) / 4).to(dtype)
    bias = torch.randn(V, generator=gen).to(dtype)
    hidden = torch.randn(n + n_other, D, generator=gen).to(dtype)
    targets = torch.randint(0, V, (n + n_other,), generator=gen)
    temperature = torch.rand(n + n_other, generator=gen) + 0.5
    mine = slice(0, n)
    expected = per_token(hidden[mine], weight, targets[mine], temperature[mine], None, backend, bias=bias)

    def check(rows, budget, *, ignore_others=False):
        """Run on ``rows`` of the pool; the rows below ``n`` must match the reference run bitwise."""
        t = targets[rows].clone()
        mask = rows >= n
        if ignore_others:
            t[mask] = -100
        got = per_token(hidden[rows], weight, t, temperature[rows], budget, backend, bias=bias)
        mine_at = (~mask).nonzero().squeeze(1)
        for g, e in zip(got, expected):
            assert torch.equal(g[mine_at], e[rows[mine_at]]), f"rows={rows.tolist()[:8]}... budget={budget}"

    everything = torch.arange(n + n_other)
    for budget in BUDGETS[backend]:
        check(torch.arange(n), budget)
        check(everything, budget)
        check(torch.cat([everything[n + 3:n + 10], everything[:n], everything[n + 50:]]), budget)
        check(torch.randperm(n + n_other, generator=gen), budget, ignore_others=True)
        for i in (0, 17, n - 1):
            check(torch.tensor([i]), budget)


def test_shifted_batch_matches_flat_rows():
    """A [B, T] batch with shift=True gives the same values as the equivalent flat rows."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(V, D, generator=gen) / 4
    hidden = torch.randn(3, 21, D, generator=gen)
    targets = torch.randint(0, V, (3, 21), generator=gen)
    targets[1, 5:9] = -100
    shifted = linear_logprobs(hidden, weight, targets, shift=True, return_entropy=True)
    flat = linear_logprobs(hidden[:, :-1].reshape(-1, D), weight, targets[:, 1:].reshape(-1), return_entropy=True)
    assert torch.equal(shifted.logprobs.reshape(-1), flat.logprobs)
    assert torch.equal(shifted.entropy.reshape(-1), flat.entropy)
