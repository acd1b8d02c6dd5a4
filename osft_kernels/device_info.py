"""One line naming the hardware a timing was taken on, for every benchmark and demo to print."""
import platform

import torch


def cpu_features() -> list[str]:
    """The vector units the CPU kernels depend on, as torch detected them: the ISA ATen dispatches to
    (``"AVX2"``, ``"AVX512"``, ...), then ``"AVX512-BF16"`` and ``"AMX"`` where present (the bfloat16
    dot-product instructions that bfloat16 GEMM operands need to be fast)."""
    features = [torch.backends.cpu.get_cpu_capability()]
    for name, probe in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        supported = getattr(torch.cpu, probe, None)
        if supported is not None and supported():
            features.append(name)
    return features


def describe(device: torch.device) -> str:
    """``"NVIDIA H200 (sm_90, 132 SMs)"`` or ``"CPU AMD EPYC, 2 threads, AVX512, AVX512-BF16"``: the model,
    and what the kernels depend on (compute capability; thread count and the vector units of
    :func:`cpu_features`)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"CPU {model}, {threads} thread{'s' if threads > 1 else ''}, {', '.join(cpu_features())}"
