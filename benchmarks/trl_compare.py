"""One training step (forward + backward of the loss) of a small Llama with a large vocabulary through TRL's fused
LM head (``trl.trainer.utils.add_fused_lm_head``), through this package's (``osft_kernels.integrations.trl``),
through the transformers patch (``osft_kernels.integrations.transformers.patch``), and through the model's own
forward with labels (full logits). A measurement, not a test::

    .venv/bin/python benchmarks/trl_compare.py                  # V=128256, hidden 256, 2048 tokens, float32, CPU

Peak memory: :class:`osft_kernels.memory.PeakMemory`, the largest total of live tensor storages allocated during
the step (parameter gradients included, parameters and inputs excluded; BLAS workspaces not seen), measured on a
separate step. Time: median of ``--steps`` steps after one warm-up, indicative only on a shared CPU.
"""
import argparse
import platform
import time
import warnings

import torch
import transformers
import trl
from trl.trainer import utils as trl_utils

from osft_kernels.integrations import transformers as osft_transformers
from osft_kernels.integrations import trl as osft_trl
from osft_kernels.memory import PeakMemory


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def build(vocab: int, hidden: int) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False, max_position_embeddings=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config).train()


def step(model, input_ids, labels, fused: bool) -> float:
    """One forward + backward; the loss."""
    model.zero_grad(set_to_none=True)
    extra = {"fused_lm_head": True} if fused else {}
    loss = model(input_ids=input_ids, labels=labels, **extra).loss
    loss.backward()
    return loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}")
    n = args.batch * args.seq
    print(f"Llama, 2 layers, hidden {args.hidden}, vocab {args.vocab}, {args.batch}x{args.seq} = {n} tokens/step, "
          f"float32; full logits would be {n * args.vocab * 4 / 2**20:.0f} MiB\n")
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = input_ids.clone()
    labels[:, : args.seq // 4] = -100

    variants = {"TRL fused head": trl_utils.add_fused_lm_head,
                "osft_kernels (use_fused_ops)": osft_trl.add_fused_lm_head,
                "osft_kernels (transformers patch)": osft_transformers.patch,
                "model's own forward (full logits)": None}
    print("| head | loss | peak MiB | s/step |")
    print("|---|---|---|---|")
    for name, add in variants.items():
        model = build(args.vocab, args.hidden)
        if add is not None:
            add(model)
        fused = add is not None and add is not osft_transformers.patch  # the patched forward needs no flag
        loss = step(model, input_ids, labels, fused)      # warm-up
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step(model, input_ids, labels, fused)
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        with PeakMemory() as mem:
            step(model, input_ids, labels, fused)
        print(f"| {name} | {loss:.6f} | {mem.peak_mib:.0f} | {sorted(times)[len(times) // 2]:.2f} |", flush=True)
        del model


if __name__ == "__main__":
    main()
