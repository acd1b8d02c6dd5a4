"""Time and peak memory of one training step of a packaged model on rollout-shaped sequences, padded
against padding-free (``model.padding_free``), side by side. A measurement, not a test::

    .venv/bin/python -m benchmarks.padding_free        # SmolLM2-135M, 16 sequences, float32, CPU

The batch is ``--batch`` sequences of a ``--prompt``-token prompt and a completion of a length drawn
uniformly from ``[--min-completion, --max-completion]`` (seeded), right-padded to the longest, the
loss on the completions as in the ``osft`` recipes. A step is the decoder forward, the fused
cross-entropy (``osft_kernels.losses.sft_loss``) and backward, in one micro-batch; time is the median
of ``--repeats`` steps after a warm-up (indicative only on a shared CPU), peak memory is
:class:`osft_kernels.memory.PeakMemory`'s.
"""
import argparse
import statistics
import time

import torch

from osft.config import ModelConfig
from osft.data import pack
from osft.model import load_causal_lm
from osft_kernels.device_info import describe
from osft_kernels.losses import sft_loss
from osft_kernels.memory import PeakMemory


def step(lm, batch) -> float:
    lm.model.zero_grad(set_to_none=True)
    loss = sft_loss(**lm.fused_inputs(batch))
    loss.backward()
    return loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--min-completion", type=int, default=16)
    parser.add_argument("--max-completion", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    print(f"{describe(torch.device('cpu'))}; torch {torch.__version__}")
    results = {}
    for padding_free in (False, True):
        lm = load_causal_lm(ModelConfig(path=args.model, dtype=args.dtype, padding_free=padding_free),
                            torch.device("cpu"))
        lm.model.train()
        vocab = lm.head().weight.shape[0]
        if not results:
            lengths = torch.randint(args.min_completion, args.max_completion + 1, (args.batch,), generator=gen)
            prompts = [torch.randint(0, vocab, (args.prompt,), generator=gen).tolist() for _ in lengths]
            completions = [torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in lengths]
            batch = pack(prompts, completions, lm.tokenizer.pad_token_id)
            tokens = int(batch.attention_mask.sum())
            print(f"{args.model}, {args.dtype}: {args.batch} sequences of {args.prompt} prompt + "
                  f"{args.min_completion}..{args.max_completion} completion tokens: {tokens} tokens, padded to "
                  f"{batch.input_ids.numel()} ({1 - tokens / batch.input_ids.numel():.0%} padding)")
        step(lm, batch)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            loss = step(lm, batch)
            times.append(time.perf_counter() - start)
        with PeakMemory() as mem:
            step(lm, batch)
        results[padding_free] = statistics.median(times)
        layout = "padding-free" if padding_free else "padded"
        print(f"{layout:>12}: loss {loss:.5f}, step {results[padding_free]:.2f} s (median of {args.repeats}), "
              f"peak {mem.peak_mib:.0f} MiB")
    print(f"padding-free step time / padded: {results[True] / results[False]:.2f}")


if __name__ == "__main__":
    main()
