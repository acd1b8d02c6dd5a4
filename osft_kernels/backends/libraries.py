"""Where the compiled extensions of the cpu and cuda backends lie: next to the package's modules."""
import importlib.machinery
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def library_path(stem: str) -> Path | None:
    """The built extension ``osft_kernels/<stem><ABI suffix>`` (e.g. ``_cpu_avx512``), or None if it was not built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = PACKAGE_DIR / f"{stem}{suffix}"
        if path.exists():
            return path
    return None
