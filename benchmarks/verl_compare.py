"""The verl drop-in (``osft_kernels.integrations.verl``) against verl 0.9.1 itself. Needs verl, which no
extra of this package installs (it pulls Ray, Hydra, W&B and transformers<5.11); on CPU::

    python3 -m venv /tmp/verlenv && /tmp/verlenv/bin/pip install torch==2.13.0 verl==0.9.1
    PYTHONPATH=. /tmp/verlenv/bin/python benchmarks/verl_compare.py

1. Kernel: the drop-in and verl's PyTorch implementation (``FusedLinearForPPO``, what verl runs with
   ``fused_kernel_options.impl_backend=torch``; its Triton kernel needs CUDA), both against float64
   logits: max abs error of logprobs, entropy and of the hidden/weight gradients under random upstream
   gradients on both outputs, and forward + backward time (indicative only on a shared CPU).
2. Hook: a tiny Llama through verl's own fused forward (``patch_forward_with_backends``) with
   ``impl_backend=triton`` after ``import_external_libs("osft_kernels.integrations.verl_patch")`` (what
   ``actor_rollout_ref.model.external_lib`` does), against the same model with ``impl_backend=torch``
   and against float64.
"""
import time

import torch

from osft_kernels.integrations import verl as verl_shim
from osft_kernels.memory import PeakMemory


def reference(hidden, weight, labels, temperature):
    """Float64 ``(logprobs, entropy)`` shaped like ``labels``, differentiable in ``hidden`` and ``weight``."""
    logp = torch.log_softmax((hidden.reshape(-1, hidden.shape[-1]) @ weight.T) / temperature, dim=-1)
    target = logp.gather(-1, labels.reshape(-1, 1)).squeeze(-1)
    return target.view(labels.shape), -(logp.exp() * logp).sum(-1).view(labels.shape)


def outputs_and_grads(fn, hidden, weight, labels, temperature, up):
    """``fn``'s outputs and the gradients of ``sum(up[0] * logprobs + up[1] * entropy)``, the seconds of
    forward + backward (median of 5), and the peak MiB of one more call (:class:`osft_kernels.memory.PeakMemory`:
    live tensors allocated during the call, the returned gradients included)."""
    times = []
    for _ in range(6):
        h, w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
        start = time.perf_counter()
        with PeakMemory() as memory:
            logprobs, entropy = fn(h, w, labels, temperature)
            grads = torch.autograd.grad((logprobs * up[0]).sum() + (entropy * up[1]).sum(), (h, w))
        times.append(time.perf_counter() - start)
    return (logprobs.detach(), entropy.detach(), *grads), sorted(times[:5])[2], memory.peak_mib


def compare_kernels():
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    verl_torch = FusedLinearForPPO()
    print("## kernel: [1, N, D] packed hidden states, N=1000, D=256, V=10007, logits of std 4, temperature 0.7\n")
    print("| dtype | implementation | logprobs | entropy | d_hidden | d_weight | fwd+bwd (s) | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    n, d, v, temperature = 1000, 256, 10007, 0.7
    hidden32, weight32 = torch.randn(1, n, d, generator=g), torch.randn(v, d, generator=g) * 0.25
    labels = torch.randint(0, v, (1, n), generator=g)
    up = (torch.randn(1, n, generator=g), torch.randn(1, n, generator=g))
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight = hidden32.to(dtype), weight32.to(dtype)
        h64, w64 = (t.double().requires_grad_() for t in (hidden, weight))
        ref_lp, ref_ent = reference(h64, w64, labels, temperature)
        ref = (ref_lp, ref_ent, *torch.autograd.grad((ref_lp * up[0]).sum() + (ref_ent * up[1]).sum(), (h64, w64)))
        scale = " / ".join(f"{r.abs().max().item():.3g}" for r in ref)
        impls = {"osft_kernels drop-in": lambda h, w, y, t: verl_shim.linear_cross_entropy(h, w, y, t, "none"),
                 "verl FusedLinearForPPO": lambda h, w, y, t: verl_torch(h, w, y, t)}
        for name, fn in impls.items():
            got, seconds, peak = outputs_and_grads(fn, hidden, weight, labels, temperature, up)
            errors = " | ".join(f"{(a.double() - r.detach()).abs().max().item():.2e}" for a, r in zip(got, ref))
            dtypes = "/".join(str(a.dtype).removeprefix("torch.") for a in got[:2])
            print(f"| {str(dtype).removeprefix('torch.')} | {name} (outputs {dtypes}) | {errors} | {seconds:.2f} | "
                  f"{peak:.0f} |")
        print(f"\nmax |float64 reference| ({str(dtype).removeprefix('torch.')}; logprobs / entropy / d_hidden / "
              f"d_weight): {scale}\n")


def compare_hook():
    from transformers import LlamaConfig, LlamaForCausalLM
    from verl.models.transformers.monkey_patch import patch_forward_with_backends
    from verl.utils.import_utils import import_external_libs

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 25))
    up = (torch.randn(2, 25), torch.randn(2, 25))
    temperature = 0.8

    def run(backend):
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
        model.zero_grad()
        out = model(input_ids=input_ids, temperature=temperature, return_dict=True)
        ((out.log_probs * up[0]).sum() + (out.entropy * up[1]).sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    verl_torch = run("torch")
    import_external_libs("osft_kernels.integrations.verl_patch")
    import verl.utils.kernel.linear_cross_entropy as verl_kernel
    assert verl_kernel.linear_cross_entropy is verl_shim.linear_cross_entropy, "the hook did not take effect"
    ours = run("triton")

    with torch.no_grad():
        hidden = model.model(input_ids=input_ids).last_hidden_state.double()
    ref_lp, ref_ent = reference(hidden, model.lm_head.weight.double(), torch.roll(input_ids, -1, -1), temperature)
    print("## hook: tiny Llama (V=1000, D=64, 2 layers, float32), 2 x 25 tokens, temperature 0.8, through verl's "
          "fused forward\n")
    print(f"- shapes: impl_backend=triton + hook {tuple(ours[0].shape)}, impl_backend=torch {tuple(verl_torch[0].shape)}")
    for name, a, b in zip(("logprobs", "entropy", "all parameter grads"), ours, verl_torch):
        print(f"- {name}: max |hook - verl torch| = {(a - b).abs().max().item():.2e} (max |value| "
              f"{b.abs().max().item():.3g})")
    for name, a, r in zip(("logprobs", "entropy"), ours, (ref_lp, ref_ent)):
        print(f"- {name}: max |hook - float64| = {(a.double() - r).abs().max().item():.2e}")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    compare_kernels()
    compare_hook()
