"""Peak memory and time of one training step (decoder forward, fused loss, backward) of a packaged model.
A measurement, not a test::

    .venv/bin/python -m benchmarks.step_memory                     # SmolLM2-135M, 4 x 512 tokens, float32, CPU

The batch is random token ids with the first ``--prompt`` fraction of each sequence ignored (a prompt),
the labels shifted as in every ``osft`` recipe. Two losses: ``cross_entropy`` (``linear_cross_entropy``,
gradients formed in forward) and ``logprobs`` (``linear_logprobs`` and a loss on them in PyTorch, the
way TRL-style trainers use the op; backward recomputes the logits).

Peak memory: :class:`osft_kernels.memory.PeakMemory`, the largest total of live tensor storages allocated
during the step (activations and parameter gradients included, parameters and inputs excluded; BLAS
workspaces not seen). Time: one step after a warm-up, indicative only on a shared CPU.
"""
import argparse
import time

import torch

from osft.config import ModelConfig
from osft.data import Sequences
from osft.model import load_causal_lm
from osft_kernels import linear_cross_entropy, linear_logprobs
from osft_kernels.device_info import describe
from osft_kernels.memory import MIB, PeakMemory


def loss_of(fused: dict, loss: str) -> torch.Tensor:
    if loss == "cross_entropy":
        return linear_cross_entropy(**fused, reduction="mean")
    logprobs = linear_logprobs(**fused).logprobs
    return -logprobs.sum() / (fused["targets"][:, 1:] != -100).sum()


def step(lm, batch: Sequences, loss: str) -> float:
    lm.model.zero_grad(set_to_none=True)
    value = loss_of(lm.fused_inputs(batch), loss)
    value.backward()
    return value.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--prompt", type=float, default=0.5, help="fraction of each sequence ignored")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    lm = load_causal_lm(ModelConfig(path=args.model, dtype="float32", backend=args.backend), torch.device("cpu"))
    lm.model.train()
    gen = torch.Generator().manual_seed(0)
    vocab, dim = lm.head().weight.shape
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    labels = input_ids.clone()
    labels[:, :int(args.seq * args.prompt)] = -100
    batch = Sequences(input_ids, torch.ones_like(input_ids), labels)
    rows = int((labels[:, 1:] != -100).sum())
    print(f"{describe(torch.device('cpu'))}; torch {torch.__version__}")
    print(f"{args.model}: vocabulary {vocab}, hidden {dim}, float32; batch {args.batch} x {args.seq} tokens, "
          f"{rows} loss tokens; backend {args.backend}")
    print(f"for scale: one float32 [loss tokens, D] copy of the hidden rows is {rows * dim * 4 / MIB:.1f} MiB, "
          f"[B*T, D] is {args.batch * args.seq * dim * 4 / MIB:.1f} MiB")
    for loss in ("cross_entropy", "logprobs"):
        step(lm, batch, loss)  # warm-up
        start = time.perf_counter()
        value = step(lm, batch, loss)
        seconds = time.perf_counter() - start
        with PeakMemory() as mem:
            step(lm, batch, loss)
        print(f"{loss:>13}: loss {value:.4f}, step {seconds:.2f} s, peak {mem.peak_mib:.1f} MiB")


if __name__ == "__main__":
    main()
