"""A local transformers causal LM, seen as a decoder producing hidden states plus an output head
that the fused losses consume (so training never materializes full-vocabulary logits)."""
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from osft_kernels.integrations.head import OutputHead, output_head

from .config import ConfigError, ModelConfig
from .data import Sequences
from .packaged import PACKAGED_MODELS, resolve_model_path


@dataclass
class CausalLM:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    backend: str = "auto"  # the fused losses' backend (model.backend)
    attention: str = "sdpa"  # the attention kernels it was loaded with (model.attn_implementation)
    padding_free: bool = False  # model.padding_free
    sharded: bool = False  # FSDP2 over the ranks of a torchrun run (osft.distributed.shard_model)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The decoder's last hidden states ``[B, T, D]`` (after the final norm), without the head; 0 at
        padding when ``padding_free`` (see :func:`packed_hidden_states`)."""
        if self.padding_free:
            return packed_hidden_states(self.decode, input_ids, attention_mask,
                                        one_row=self.attention == "flash_attention_2")
        return self.decode(input_ids=input_ids, attention_mask=attention_mask)

    def decode(self, **inputs) -> Tensor:
        """The decoder's last hidden states for ``inputs`` (``input_ids`` and ``attention_mask`` or
        ``position_ids``), without a cache. A sharded model runs its root module's forward, with the
        output layer applied to the last position only: FSDP2 gathers the root's parameters (the
        output layer among them) there and reduces their gradients after backward, tied or not."""
        if not self.sharded:
            return self.model.base_model(**inputs, use_cache=False).last_hidden_state
        captured = []
        hook = self.model.base_model.register_forward_hook(
            lambda module, args, out: captured.append(out.last_hidden_state))
        try:
            self.model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
        return captured[0]

    def head(self) -> OutputHead:
        return output_head(self.model)

    def fused_inputs(self, batch: Sequences, temperature: float = 1.0) -> dict:
        """The arguments every fused op and loss of ``osft_kernels`` shares, for ``batch`` at
        ``temperature``: the decoder's hidden states ``[B, T, D]``, the output layer (weight, bias,
        softcap), the labels as targets with ``shift=True``, the temperature times the model's logit
        scaling, and the backend. Pass them as ``**`` keywords."""
        head = self.head()
        return {"hidden": self.hidden_states(batch.input_ids, batch.attention_mask), "weight": head.weight,
                "targets": batch.labels, "bias": head.bias, "softcap": head.softcap,
                "temperature": temperature * head.temperature_scale, "shift": True, "backend": self.backend}

    @property
    def device(self) -> torch.device:
        return self.model.device


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Sequences of ``lengths`` placed first-fit in decreasing length into rows of ``width`` tokens (a longer
    sequence gets a row of its own): the sequence indices of each row, in their order there."""
    rows, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if fit is None:
            rows.append([])
            room.append(width)
            fit = len(rows) - 1
        rows[fit].append(index)
        room[fit] -= lengths[index]
    return rows


def packed_hidden_states(decode: Callable[..., Tensor], input_ids: Tensor, attention_mask: Tensor, *,
                         one_row: bool = False) -> Tensor:
    """The last hidden states ``[B, T, D]`` of a padded batch from ``decode(input_ids=, position_ids=)``
    (:meth:`CausalLM.decode`), computed padding-free: the tokens
    where ``attention_mask`` is 1 run back to back with ``position_ids`` restarting at every sequence and
    no attention mask, from which transformers builds block-causal masks (sdpa, eager) or runs
    variable-length attention (flash-attn). With ``one_row`` all sequences share one row (flash-attn
    skips the other sequences' blocks); otherwise they are packed into rows as long as the longest
    sequence (:func:`pack_rows`), because sdpa and eager attend over a whole row under a dense mask.
    The outputs are put back on the padded grid (0 at padding), so the losses see the usual layout;
    their gradient flows back through it."""
    present = attention_mask.bool()
    lengths = attention_mask.sum(1).tolist()
    rows = pack_rows(lengths, sum(lengths) if one_row else max(lengths))
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = input_ids.new_zeros(len(rows), width)
    positions = torch.empty_like(ids)
    source = torch.empty(len(lengths), input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    count = functools.partial(torch.arange, device=input_ids.device)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids[r, start:start + lengths[i]] = input_ids[i, present[i]]
            positions[r, start:start + lengths[i]] = count(lengths[i])
            source[i, :lengths[i]] = r * width + start + count(lengths[i])
            start += lengths[i]
        positions[r, start:] = count(width - start)  # the row's tail: a block of its own
    packed = decode(input_ids=ids, position_ids=positions)
    flat = packed.reshape(-1, packed.shape[-1])
    in_order = flat.index_select(0, torch.cat([source[i, :n] for i, n in enumerate(lengths)]))
    return packed.new_zeros(*input_ids.shape, packed.shape[-1]).masked_scatter(present[..., None], in_order)


def default_device() -> torch.device:
    """Where osft trains, generates and scores: the current CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware, faster than float32: a CUDA GPU with
    bfloat16 support, or a CPU with AVX512-BF16 or AMX (oneDNN runs torch's bfloat16 products there;
    elsewhere they are emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def attention_implementation(setting: str, device: torch.device) -> str:
    """The attention kernels that ``model.attn_implementation`` (``setting``) gives a model on ``device``:
    ``auto`` is flash-attn 2 on a CUDA device where ``flash_attn`` is installed, else PyTorch's ``sdpa``;
    a forced ``flash_attention_2`` needs both."""
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if setting == "auto":
        return "flash_attention_2" if flash else "sdpa"
    if setting == "flash_attention_2" and not flash:
        where = "the flash_attn package (pip install '.[gpu]')" if device.type == "cuda" else "a CUDA device"
        raise ConfigError(f"model.attn_implementation: flash_attention_2 needs {where}; use auto, sdpa or eager")
    return setting


def _unreadable_safetensors(directory: str) -> list[str]:
    """The ``*.safetensors`` files in ``directory`` whose header does not read (e.g. truncated ones)."""
    unreadable = []
    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except SafetensorError:
            unreadable.append(str(file))
    return unreadable


def load_causal_lm(config: ModelConfig, device: torch.device) -> CausalLM:
    """Load ``config.path``: a local directory, or a packaged model's name (:mod:`osft.packaged`);
    nothing is downloaded. A path that is not a model directory with its tokenizer and readable
    weights raises :class:`ConfigError` naming it."""
    attention = attention_implementation(config.attn_implementation, device)
    path = resolve_model_path(config.path)
    if not Path(path).is_dir():
        raise ConfigError(f"model.path {config.path!r} is neither a directory nor a packaged model name "
                          f"({', '.join(PACKAGED_MODELS)})")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.path {path!r} has no config.json: not a transformers model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        reason = error if any(Path(path).glob("tokenizer*")) else "no tokenizer files there"
        raise ConfigError(f"model.path {path!r} has no loadable tokenizer ({reason}); save the tokenizer into the "
                          f"model directory with tokenizer.save_pretrained") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(config.dtype, device),
                                                     attn_implementation=attention, local_files_only=True)
    except (OSError, SafetensorError) as error:
        unreadable = ", ".join(_unreadable_safetensors(path)) or path
        raise ConfigError(f"model.path {path!r}: cannot read the weights in {unreadable} (truncated or corrupt?): "
                          f"{error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    if config.gradient_checkpointing:  # transformers 5 renamed it; 4.x has only the old name
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    output_head(model)  # refuse unsupported heads before any work
    return CausalLM(model, tokenizer, backend=config.backend, attention=attention, padding_free=config.padding_free)
