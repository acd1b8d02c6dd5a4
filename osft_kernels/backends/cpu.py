"""CPU backend, the default for CPU tensors when its C++ extension is built: the chunked driver with
the GEMM and epilogue of ``csrc/cpu`` in cache-resident tiles.

Each ``ROW_TILE x VOCAB_BLOCK`` tile of logits is one BLAS product into a per-thread float32 (float64
for float64 inputs) buffer; the epilogue (bias, softcap, temperature, block statistics, the logit
gradient) runs on it in SIMD while it is in cache, and the gradient tile feeds ``d_hidden`` at once.
Logits reach memory only where the gradients are formed in the forward pass (the chunk buffer of
the driver).

bfloat16 inputs stay bfloat16 GEMM operands with float32 accumulation where the CPU has AMX or
AVX512-BF16 (checked at run time): ATen's batch-reduce GEMM (oneDNN's brgemm micro-kernel) on
operands packed in its VNNI layout; the logit gradient is rounded to bfloat16 for the two gradient
products, as on the GPU. Other CPUs, float16 inputs and odd D compute from float32 operands, through
the CPU BLAS.

The extension is built per x86 vector width by ``setup.py``; :func:`extension` loads the widest
variant that ATen uses on this CPU (``torch.backends.cpu.get_cpu_capability()``, which honours
``ATEN_CPU_CAPABILITY``).
"""
import functools

import torch
from torch import Tensor

from .. import driver
from ..driver import NUM_PARTIALS, VOCAB_BLOCK, Chunk, GradAccumulator, OutputLayer
from ..row_stats import NUM_STATS
from .libraries import library_path

VARIANTS = ("avx512", "avx2", "default")  # widest first
BUILD_HINT = ("build it with a C++ compiler: pip install --no-build-isolation -e . (or pip install . with the "
              "pinned torch of pyproject.toml)")


def machine_variant() -> str:
    """The widest extension variant this CPU runs, by ATen's own capability detection."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return capability if capability in VARIANTS else "default"


@functools.cache
def extension() -> tuple[str | None, int, str]:
    """``(variant, row_tile, message)``: the loaded extension variant (None if none could be loaded),
    the row multiple its tiles need, and why it is missing."""
    usable = VARIANTS[VARIANTS.index(machine_variant()):]
    for name in usable:
        path = library_path(f"_cpu_{name}")
        if path is None:
            continue
        try:
            torch.ops.load_library(str(path))
        except OSError as error:
            return None, 0, f"the C++ CPU extension {path.name} failed to load ({error}); {BUILD_HINT}"
        capability, row_tile, vocab_block, num_stats, num_partials = torch.ops.osft_kernels_cpu.build_info().split()
        if (int(vocab_block), int(num_stats), int(num_partials)) != (VOCAB_BLOCK, NUM_STATS, NUM_PARTIALS):
            return None, 0, f"the C++ CPU extension {path.name} is stale (layout {vocab_block}/{num_stats}/" \
                            f"{num_partials}); {BUILD_HINT}"
        return capability, int(row_tile), ""
    return None, 0, f"osft_kernels was installed without its C++ CPU extension; {BUILD_HINT}"


def available() -> bool:
    return extension()[0] is not None


def _block_ranges(vocab_size: int):
    return ((c0, min(vocab_size, c0 + VOCAB_BLOCK)) for c0 in range(0, vocab_size, VOCAB_BLOCK))


def vnni_columns(weight: Tensor) -> Tensor:
    """``weight [V, D]`` (D even) as the logits products' right operands: the block of columns
    ``c0:c1`` (one ``VOCAB_BLOCK``) at ``c0 * D``, laid out ``[D / 2, c1 - c0, 2]``."""
    v, d = weight.shape
    out = weight.new_empty(v * d)
    for c0, c1 in _block_ranges(v):
        out[c0 * d:c1 * d].view(d // 2, c1 - c0, 2).copy_(weight[c0:c1].view(c1 - c0, d // 2, 2).transpose(0, 1))
    return out


def vnni_rows(matrix: Tensor, block: int) -> Tensor:
    """``matrix [K, N]`` as right operands of products that reduce over its rows, ``block`` rows at a
    time: the rows ``k0:k1`` at ``k0 * N``, laid out ``[ceil((k1 - k0) / 2), N, 2]`` (an odd last row
    is paired with zeros)."""
    k, n = matrix.shape
    out = matrix.new_zeros((k + 1) // 2 * 2 * n)
    for k0 in range(0, k, block):
        k1 = min(k, k0 + block)
        rows = (k1 - k0 + 1) // 2 * 2
        view = out[k0 * n:k0 * n + rows * n].view(rows // 2, n, 2)
        pairs = matrix[k0:k1 - (k1 - k0) % 2].view(-1, 2, n).transpose(1, 2)
        view[:pairs.shape[0]].copy_(pairs)
        if (k1 - k0) % 2:
            view[-1, :, 0].copy_(matrix[k1 - 1])
    return out


@functools.cache
def bfloat16_products() -> bool:
    """Whether this CPU runs the extension's bfloat16 products (oneDNN's brgemm on AMX or
    AVX512-BF16): checked once on a small problem against float32."""
    if extension()[0] is None or not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return False
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 8, generator=gen).bfloat16()
    weight = torch.randn(40, 8, generator=gen).bfloat16()
    logits = torch.empty(64, 40)
    try:
        torch.ops.osft_kernels_cpu.fused_stats(
            hidden, weight, vnni_columns(weight), None, torch.zeros(64, dtype=torch.long), torch.ones(64), 0.0, 0, 40,
            False, False, False, torch.empty(64, 1, NUM_PARTIALS), torch.empty(64), logits)
    except RuntimeError:
        return False
    return torch.allclose(logits, hidden.float() @ weight.float().T, rtol=1e-5, atol=1e-5)


class CppEpilogue:
    """:class:`osft_kernels.driver.Epilogue` in C++ on a float32 (float64) chunk buffer that the CPU
    BLAS filled: one parallel pass per step instead of a sequence of PyTorch ops."""

    def work_bytes(self, *, entropy: bool) -> int:
        return 4

    def logits(self, raw: Tensor, layer: OutputLayer, chunk: Chunk, v0: int) -> Tensor:
        torch.ops.osft_kernels_cpu.transform_logits(raw, layer.bias, chunk.inverse_temperature(raw.dtype),
                                                    layer.kernel_softcap, v0)
        return raw

    def block_stats(self, z: Tensor, layer: OutputLayer, chunk: Chunk, v0: int, partials: Tensor,
                    target_logit: Tensor, *, entropy: bool, mean: bool, square: bool) -> None:
        torch.ops.osft_kernels_cpu.buffer_stats(z, chunk.targets, v0, layer.vocab_size, entropy, mean, square,
                                                partials, target_logit)

    def logit_grad(self, z: Tensor, layer: OutputLayer, chunk: Chunk, v0: int, stats: Tensor, coef: Tensor,
                   grad_dtype: torch.dtype, *, entropy: bool, mean: bool) -> Tensor:
        if grad_dtype != z.dtype:
            raise TypeError(f"the C++ epilogue writes the gradient in the compute dtype {z.dtype}, not {grad_dtype}")
        torch.ops.osft_kernels_cpu.buffer_grad(z, chunk.targets, chunk.inverse_temperature(z.dtype),
                                               layer.kernel_softcap, v0, layer.vocab_size, stats.contiguous(),
                                               coef.contiguous(), entropy, mean)
        return z


class CpuKernels:
    """:class:`osft_kernels.driver.ChunkKernels` of the cpu backend.

    bfloat16 inputs with even D, where :func:`bfloat16_products` holds: bfloat16 products and the
    epilogue fused in cache-resident tiles (``osft_kernels_cpu::fused_stats`` and ``fused_grads``),
    the columns of the current vocabulary range packed in one layout for the logits and one for
    ``d_hidden`` (the whole weight where chunks span the vocabulary).
    Otherwise: the CPU BLAS on float32 (float64) chunks, as multithreaded GEMMs reach a higher rate
    than per-tile ones there, with :class:`CppEpilogue`."""

    def __init__(self):
        self._fused = False
        self._unfused = driver.GemmEpilogue(CppEpilogue())
        self._dz = None
        self._packed_range: tuple[int, int] | None = None
        self._packs: dict[str, Tensor] = {}
        self._hidden_pack: tuple[Tensor, Tensor] | None = None

    def gemms(self, weight: Tensor) -> driver.Gemms:
        self._fused = weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0 and bfloat16_products()
        return driver.Gemms(weight.dtype, weight.device, half_on_cpu=self._fused)

    def work_bytes(self, *, entropy: bool) -> int:
        # fused: the float32 chunk buffer (kept logits) and dz in bfloat16 for the weight gradient
        return 6 if self._fused else self._unfused.work_bytes(entropy=entropy)

    def row_align(self, device: torch.device) -> int:
        return extension()[1] if self._fused else self._unfused.row_align(device)

    def _packed(self, layer: OutputLayer, v0: int, v1: int, layout: str) -> Tensor:
        """The weight's columns ``v0:v1`` packed for the logits (``"columns"``, :func:`vnni_columns`) or
        for ``d_hidden`` (``"rows"``, :func:`vnni_rows`), kept until the driver moves to other columns."""
        if self._packed_range != (v0, v1):
            self._packed_range, self._packs = (v0, v1), {}
        if layout not in self._packs:
            columns = layer.weight[v0:v1]
            self._packs[layout] = vnni_columns(columns) if layout == "columns" else vnni_rows(columns, VOCAB_BLOCK)
        return self._packs[layout]

    def _packed_hidden(self, chunk: Chunk) -> Tensor:
        """The chunk's hidden rows packed for the weight gradient (:func:`vnni_rows`), kept while the
        driver stays on that chunk (the recompute backward visits it once per vocabulary range)."""
        if self._hidden_pack is None or self._hidden_pack[0] is not chunk.hidden:
            self._hidden_pack = (chunk.hidden, vnni_rows(chunk.hidden, chunk.rows))
        return self._hidden_pack[1]

    def _dz_t(self, entries: int) -> Tensor:
        """The bfloat16 logit gradient of a chunk, transposed, for the weight and bias gradients."""
        if self._dz is None or self._dz.numel() < entries:
            self._dz = torch.empty(entries, dtype=torch.bfloat16)
        return self._dz

    def block_stats(self, chunk: Chunk, layer: OutputLayer, v0: int, v1: int, buffer: Tensor, partials: Tensor,
                    target_logit: Tensor, *, keep_logits: bool, entropy: bool, mean: bool,
                    square: bool) -> Tensor | None:
        if not self._fused:
            return self._unfused.block_stats(chunk, layer, v0, v1, buffer, partials, target_logit,
                                             keep_logits=keep_logits, entropy=entropy, mean=mean, square=square)
        logits = buffer[:chunk.rows * (v1 - v0)].view(chunk.rows, v1 - v0) if keep_logits else None
        torch.ops.osft_kernels_cpu.fused_stats(chunk.hidden, layer.weight, self._packed(layer, v0, v1, "columns"),
                                               layer.bias, chunk.targets, chunk.inverse_temperature(buffer.dtype),
                                               layer.kernel_softcap, v0, v1, entropy, mean, square, partials,
                                               target_logit, logits)
        return logits

    def add_grads(self, grads: GradAccumulator, chunk: Chunk, layer: OutputLayer, v0: int, v1: int,
                  buffer: Tensor, logits: Tensor | None, stats: Tensor, coef: Tensor, r0: int, *, entropy: bool,
                  mean: bool) -> None:
        if not self._fused:
            self._unfused.add_grads(grads, chunk, layer, v0, v1, buffer, logits, stats, coef, r0, entropy=entropy,
                                    mean=mean)
            return
        rows = stats.shape[0]
        d_weight, d_bias = grads.columns(v0, v1)
        torch.ops.osft_kernels_cpu.fused_grads(
            chunk.hidden, layer.weight, layer.bias, chunk.targets, chunk.inverse_temperature(buffer.dtype),
            layer.kernel_softcap, v0, v1, stats.contiguous(), coef.contiguous(), entropy, mean, rows, logits,
            None if logits is not None else self._packed(layer, v0, v1, "columns"),
            None if grads.hidden is None else grads.hidden[r0:r0 + rows],
            None if grads.hidden is None else self._packed(layer, v0, v1, "rows"), d_weight, d_bias,
            None if d_weight is None else self._packed_hidden(chunk),
            None if d_weight is None and d_bias is None else self._dz_t(chunk.rows * (v1 - v0)))


def check_available(device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got {device} tensors")
    variant, _, message = extension()
    if variant is None:
        raise ValueError(f"backend 'cpu' is not available: {message}")


BACKEND = driver.ChunkedBackend(CpuKernels).backend("cpu")
