"""Setuptools entry point for the C++ extensions; the package metadata lives in pyproject.toml.

The CPU kernels (``csrc/cpu``) are built once per x86 vector width (AVX-512, AVX2, and a baseline),
and ``osft_kernels.backends.cpu`` loads the widest one the CPU runs. The CUDA epilogue (``csrc/cuda``)
is built when torch is a CUDA build and nvcc is found. They need torch in the build
environment (``pip install --no-build-isolation .`` next to an installed torch, or build isolation
with the pinned torch of pyproject.toml) and a C++ compiler with OpenMP. Without torch at build time,
or with ``OSFT_KERNELS_NO_EXTENSIONS=1``, the package installs as pure Python and ``backend="cpu"``
explains how to build it.
"""
import importlib.util
import os
import platform
from pathlib import Path

from setuptools import setup

X86_VARIANTS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def cpu_extensions(cpp_extension):
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    variants = X86_VARIANTS if x86 else {"default": X86_VARIANTS["default"]}
    return [cpp_extension.CppExtension(f"osft_kernels._cpu_{name}", [f"csrc/cpu/variant_{name}.cpp"],
                                       extra_compile_args=["-O3", "-fopenmp", *flags], extra_link_args=["-fopenmp"])
            for name, flags in variants.items()]


# the CUDA epilogue's GPU code: sm_80 runs on every 8.x GPU (A100, A10, L40, RTX 3090/4090), sm_90a on
# H100/H200, sm_100a on B200; the PTX of compute_80 is compiled by the driver for any other (RTX 5090, B300)
CUDA_ARCHS = ("80", "90a", "100a")


def pip_cuda_includes() -> list[str]:
    """Header folders of the nvidia-* wheels that a CUDA build of torch from PyPI installs, searched after
    the toolkit's own: torch's CUDA headers include cuBLAS, cuSPARSE and cuSOLVER headers, which a toolkit
    with only nvcc lacks."""
    spec = importlib.util.find_spec("nvidia")
    roots = spec.submodule_search_locations if spec is not None else []
    return sorted(str(folder) for root in roots for folder in Path(root).glob("*/include"))


def cuda_extensions(cpp_extension):
    """``osft_kernels._cuda`` (csrc/cuda) when torch is a CUDA build and nvcc is found (CUDA_HOME)."""
    import torch

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return []
    nvcc = ["-O3", *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS),
            "-gencode=arch=compute_80,code=compute_80", *(f"-isystem={d}" for d in pip_cuda_includes())]
    return [cpp_extension.CUDAExtension("osft_kernels._cuda", ["csrc/cuda/epilogue.cu"],
                                        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc})]


def build_options() -> dict:
    if os.environ.get("OSFT_KERNELS_NO_EXTENSIONS") == "1":
        return {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("osft-kernels: torch is not importable at build time, installing without the C++ extensions "
              "(pip install --no-build-isolation . next to an installed torch builds them)")
        return {}
    # OSFT_KERNELS_EXTENSIONS=cuda (make cuda-build) builds only the CUDA one
    kinds = os.environ.get("OSFT_KERNELS_EXTENSIONS", "cpu,cuda").split(",")
    extensions = [*(cpu_extensions(cpp_extension) if "cpu" in kinds else []),
                  *(cuda_extensions(cpp_extension) if "cuda" in kinds else [])]
    return {"ext_modules": extensions,
            "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}}


setup(**build_options())
