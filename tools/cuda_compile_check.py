"""Compile every kernel of the CUDA epilogue for each target GPU architecture, without a GPU.

``python tools/cuda_compile_check.py [--arch sm_80 ...] [--json]`` compiles ``csrc/cuda/compile_check.cu``
(which instantiates every kernel variant through the launchers that ``csrc/cuda/epilogue.cu`` calls)
with nvcc into a cubin per architecture, with torch's extension flags, and prints what ptxas reports
per kernel: registers, spill stores and loads, stack frame and static shared memory. Exits with 1 on
a compile error, a spill or an architecture without kernels (2 when nvcc is not on PATH).
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "compile_check.cu"
# A100 (and every 8.x GPU), L40/RTX 4090, H100/H200, B200, RTX 5090
ARCHITECTURES = ("sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120")
# as torch.utils.cpp_extension compiles the extension (its COMMON_NVCC_FLAGS and C++ standard)
NVCC_FLAGS = ["-std=c++20", "-O3", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
              "-Xptxas", "-v", "-Werror", "all-warnings"]


@dataclass
class Kernel:
    """ptxas's report on one entry function (bytes are per thread, but shared memory per CTA)."""

    kernel: str
    arch: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled name -> ``block_stats_kernel<true>`` (c++filt, less namespace, return type and arguments)."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {name: name for name in names}
    lines = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    short = {}
    for name, full in zip(names, lines.splitlines()):
        match = re.search(r"osft::cuda::(\w+<.*>)\(", full)
        short[name] = match.group(1) if match else full
    return short


def parse_ptxas(text: str, arch: str) -> list[Kernel]:
    """The entry functions of ``nvcc -Xptxas -v`` output, with their resources."""
    kernels: dict[str, Kernel] = {}
    current = properties = None
    for line in text.splitlines():
        if match := re.search(r"Compiling entry function '(\w+)'", line):
            current = kernels.setdefault(match.group(1), Kernel(match.group(1), arch))
        elif match := re.search(r"Function properties for (\w+)", line):
            properties = kernels.get(match.group(1))
        elif (match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                 line)) and properties is not None:
            properties.stack_bytes, properties.spill_stores, properties.spill_loads = map(int, match.groups())
        elif (match := re.search(r"Used (\d+) registers", line)) and current is not None:
            current.registers = int(match.group(1))
            shared = re.search(r"(\d+) bytes smem", line)
            current.shared_bytes = int(shared.group(1)) if shared else 0
    names = demangle(list(kernels))
    for kernel in kernels.values():
        kernel.kernel = names[kernel.kernel]
    return sorted(kernels.values(), key=lambda k: k.kernel)


def compile_arch(nvcc: str, arch: str, folder: Path) -> tuple[list[Kernel], str]:
    """(kernels, error output): the error output is empty when nvcc succeeded."""
    command = [nvcc, "-cubin", f"-arch={arch}", *NVCC_FLAGS, "-o", str(folder / f"{arch}.cubin"), str(SOURCE)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        return [], output
    return parse_ptxas(output, arch), ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc is not on PATH", file=sys.stderr)
        return 2
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    kernels, errors = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.arch:
            found, error = compile_arch(nvcc, arch, Path(folder))
            kernels += found
            if error or not found:
                errors[arch] = error or "no kernel was compiled"
    problems = [f"{arch}: compile error:\n{error}" for arch, error in errors.items()]
    problems += [f"{k.arch} {k.kernel}: spills {k.spill_stores} B stored, {k.spill_loads} B loaded"
                 for k in kernels if k.spills]
    if args.json:
        print(json.dumps({"nvcc": version.strip().splitlines()[-1], "kernels": [asdict(k) for k in kernels],
                          "problems": problems}))
    else:
        print(version.strip().splitlines()[-1])
        print(f"{'kernel':40} {'arch':8} {'regs':>5} {'spill st B':>10} {'spill ld B':>10} {'stack B':>7} "
              f"{'smem B':>7}")
        for k in kernels:
            print(f"{k.kernel:40} {k.arch:8} {k.registers:>5} {k.spill_stores:>10} {k.spill_loads:>10} "
                  f"{k.stack_bytes:>7} {k.shared_bytes:>7}")
        print("\n".join(problems) or "ok: every kernel compiled for every architecture without spills")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
