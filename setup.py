"""Setuptools entry point for the C++ extensions; the package metadata lives in pyproject.toml.

The CPU kernels (``csrc/cpu``) are built once per x86 vector width (AVX-512, AVX2, and a baseline),
and ``osft_kernels.backends.cpu`` loads the widest one the CPU runs. They need torch in the build
environment (``pip install --no-build-isolation .`` next to an installed torch, or build isolation
with the pinned torch of pyproject.toml) and a C++ compiler with OpenMP. Without torch at build time,
or with ``OSFT_KERNELS_NO_EXTENSIONS=1``, the package installs as pure Python and ``backend="cpu"``
explains how to build it.
"""
import os
import platform

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


def build_options() -> dict:
    if os.environ.get("OSFT_KERNELS_NO_EXTENSIONS") == "1":
        return {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("osft-kernels: torch is not importable at build time, installing without the C++ extensions "
              "(pip install --no-build-isolation . next to an installed torch builds them)")
        return {}
    return {"ext_modules": cpu_extensions(cpp_extension),
            "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}}


setup(**build_options())
