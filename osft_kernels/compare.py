"""Fused vs naive, side by side: the same losses and gradients, a fraction of the memory.

    python -m osft_kernels.compare [--tokens 4096 --hidden 1024 --vocab 32000]

Runs cross-entropy (mean) and per-token logprobs + entropy with non-uniform upstream gradients,
forward and backward, once with materialized logits (``hidden @ weight.T`` then PyTorch's softmax
ops) and once with :mod:`osft_kernels`; prints each one's result, its largest difference to the
naive gradients, wall time and peak extra memory. Exits with status 1 if any result differs
beyond float32 tolerance.
"""
import argparse
import sys
import time

import torch
import torch.nn.functional as F

from . import linear_cross_entropy, linear_logprobs
from .device_info import describe
from .memory import PeakMemory


def naive_cross_entropy(hidden, weight, targets, upstream):
    return F.cross_entropy(hidden @ weight.T, targets)


def fused_cross_entropy(hidden, weight, targets, upstream):
    return linear_cross_entropy(hidden, weight, targets)


def naive_logprobs(hidden, weight, targets, upstream):
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (logp.gather(1, targets[:, None]).squeeze(1) * upstream[0]).sum() + (entropy * upstream[1]).sum()


def fused_logprobs(hidden, weight, targets, upstream):
    out = linear_logprobs(hidden, weight, targets, return_entropy=True)
    return (out.logprobs * upstream[0]).sum() + (out.entropy * upstream[1]).sum()


def run(fn, hidden, weight, targets, upstream):
    """Forward + backward of ``fn``; returns (value, d_hidden, d_weight, seconds, peak extra MiB)."""
    hidden.grad = weight.grad = None
    with PeakMemory() as mem:
        start = time.perf_counter()
        value = fn(hidden, weight, targets, upstream)
        value.backward()
        seconds = time.perf_counter() - start
    return value.item(), hidden.grad, weight.grad, seconds, mem.peak_mib


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    n, d, v = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = (torch.randn(n, generator=gen), torch.randn(n, generator=gen))

    print(f"device: {describe(hidden.device)}, torch {torch.__version__}, float32")
    print(f"tokens N={n}, hidden D={d}, vocab V={v}; full logits would be {n * v * 4 / 2**20:.0f} MiB\n")
    print(f"{'operation':<26}{'implementation':<16}{'value':>14}{'max |d grad|':>14}{'time s':>9}{'peak MiB':>10}")
    ok = True
    for op, naive, fused in [("cross-entropy (mean)", naive_cross_entropy, fused_cross_entropy),
                             ("logprobs + entropy", naive_logprobs, fused_logprobs)]:
        ref = run(naive, hidden, weight, targets, upstream)
        got = run(fused, hidden, weight, targets, upstream)
        errors = [(g - r).abs().max().item() / r.abs().max().item() for g, r in zip(got[1:3], ref[1:3])]
        value_error = abs(got[0] - ref[0]) / max(abs(ref[0]), 1.0)
        ok &= value_error < 1e-5 and max(errors) < 1e-4
        for name, (value, *_, seconds, peak), err in [("naive", ref, "-"), ("osft_kernels", got, f"{max(errors):.1e}")]:
            print(f"{op:<26}{name:<16}{value:>14.6f}{err:>14}{seconds:>9.2f}{peak:>10.0f}")
        print(f"{'':<26}{'ratio':<16}{'':>14}{'':>14}{got[3] / ref[3]:>9.2f}{got[4] / ref[4]:>10.3f}")
    print("\nmax |d grad| is relative to the largest naive gradient; peak MiB is memory allocated during "
          "forward + backward above the inputs.")
    print("results match" if ok else "RESULTS DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
