"""One line naming the hardware a timing was taken on, for every benchmark and demo to print."""
import platform

import torch


def describe(device: torch.device) -> str:
    """``"NVIDIA H200 (sm_90, 132 SMs)"`` or ``"CPU AMD EPYC, 2 threads, AVX2"``: the model, and what the
    kernels depend on (compute capability; thread count and the vector ISA torch detected)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
