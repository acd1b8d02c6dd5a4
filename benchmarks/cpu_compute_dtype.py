"""Why the chunked backend computes half-precision inputs in float32 on CPU.

    python benchmarks/cpu_compute_dtype.py

Times one logits GEMM (a token chunk against a vocabulary slice) in float32, bfloat16 and float16,
and the whole bf16 cross-entropy forward + backward two ways: upcasting the chunks to float32 (what
the torch backend does) and computing the GEMMs in bf16 (the naive bf16 path). CPU only.
"""
import time

import torch
import torch.nn.functional as F

from osft_kernels import linear_cross_entropy


def seconds(fn, repeat=2):
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main():
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    m, k, n = 256, 1024, 4096
    print(f"\nlogits GEMM [{m} x {k}] @ [{k} x {n}]")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        t = seconds(lambda a=a, b=b: a @ b.T)
        print(f"  {dtype!s:<16}{2 * m * k * n / t / 1e9:8.1f} GFLOP/s")

    n_tok, d, v = 256, 256, 8192
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_tok, d, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(v, d, generator=gen).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n_tok,), generator=gen)
    print(f"\nbf16 cross-entropy forward + backward, N={n_tok}, D={d}, V={v}")
    fused = seconds(lambda: linear_cross_entropy(hidden, weight, targets).backward(), repeat=1)
    naive = seconds(lambda: F.cross_entropy((hidden @ weight.T).float(), targets).backward(), repeat=1)
    print(f"  chunks upcast to float32 (torch backend): {fused:7.2f} s")
    print(f"  bf16 GEMMs (naive):                       {naive:7.2f} s   ({naive / fused:.0f}x slower)")


if __name__ == "__main__":
    main()
