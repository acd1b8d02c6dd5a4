"""The run configuration: one dataclass tree, read from YAML plus dotted ``key.sub=value`` overrides.

Unknown keys and values of the wrong type, outside their choices or outside their range are refused
with the full dotted name of the key (a numeric field's range is part of its type, e.g.
``lr: Positive``); ``~`` and environment variables in paths are expanded; the
resolved configuration is written into the run directory.
"""
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be run, with the dotted key that is wrong."""


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts, and how its error message states them."""

    test: typing.Callable[[float], bool]
    says: str


# numeric fields, with their range next to them (``Annotated`` metadata that the loader checks)
Positive = Annotated[float, Range(lambda v: v > 0, "> 0")]
PositiveInt = Annotated[int, Range(lambda v: v > 0, "> 0")]
NonNegative = Annotated[float, Range(lambda v: v >= 0, ">= 0")]
Count = Annotated[int, Range(lambda v: v >= 0, ">= 0")]
Fraction = Annotated[float, Range(lambda v: 0 < v <= 1, "in (0, 1]")]
Below1 = Annotated[float, Range(lambda v: 0 <= v < 1, "in [0, 1)")]
Seed = Annotated[int, Range(lambda v: 0 <= v < 2**32, "in [0, 2**32) (what the RNG seeding functions accept)")]


@dataclass
class ModelConfig:
    path: str = ""                       # a local transformers causal-LM directory or a packaged model name
                                         # (smollm2-135m, gemma3-270m; see osft.packaged) (required)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    gradient_checkpointing: bool = False
    backend: Literal["auto", "torch", "triton", "reference"] = "auto"  # the fused loss's backend
    # auto: flash_attention_2 on a CUDA device where flash_attn is installed (pip install '.[gpu]'), else sdpa
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # training and scoring forwards run the micro-batch's sequences back to back in one row, positions
    # restarting per sequence: no FLOPs on padding (TRL's padding_free, verl's use_remove_padding)
    padding_free: bool = False


@dataclass
class DataConfig:
    train: str = ""                      # a .jsonl or .parquet file (required)
    prompt_column: str = "prompt"        # text, or chat messages [{"role", "content"}]
    answer_column: str = "answer"
    response_column: str = "response"    # sft and pear: the response to train on
    behavior_logprobs_column: str = "behavior_logprobs"  # pear
    max_prompt_tokens: PositiveInt = 512
    max_response_tokens: PositiveInt = 512


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"  # vllm: colocated, in-process, weights synced after each update
    max_new_tokens: PositiveInt = 256
    top_p: Fraction = 1.0
    batch_size: PositiveInt = 16         # completions decoded together (hf engine)
    autocast: Literal["auto", "bfloat16", "off"] = "auto"  # hf engine: generate under bfloat16 autocast;
    # auto: when the weights are float32 and the device multiplies bfloat16 natively (osft.model.native_bfloat16)
    mask_truncated_completions: bool = False  # osft, grpo: completions cut at max_new_tokens get no loss
    vllm_memory_fraction: Fraction = 0.3  # vLLM's gpu_memory_utilization


@dataclass
class OptimConfig:
    lr: Positive = 1e-6
    weight_decay: NonNegative = 0.01
    beta1: Below1 = 0.9
    beta2: Below1 = 0.999
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: Count = 0
    max_grad_norm: Positive = 1.0
    micro_batch_tokens: PositiveInt = 4096  # tokens per forward/backward; a step accumulates micro-batches


@dataclass
class OSFTConfig:
    tau_s_start: Positive = 0.6          # sampling temperature at the start (0.9 for general models)
    tau_s_end: Positive = 1.0
    anneal_epochs: Positive = 2.0        # linear anneal length; tau_s_end = tau_s_start for a constant
    tau_t: Positive = 1.0                # training temperature


@dataclass
class SFTConfig:
    normalize: Literal["tokens", "sequences"] = "tokens"


@dataclass
class EvalConfig:
    data: str = ""                       # a held-out .jsonl/.parquet with prompt and answer ("": no evaluation)
    every: Count = 0                     # evaluate every N steps (0: only before training and at the end)
    samples: PositiveInt = 4             # n completions per prompt; pass@k for k = 1, 2, 4, ... <= n
    temperature: Positive = 1.0
    max_prompts: Count = 0               # 0: all
    greedy: bool = False                 # also report eval/greedy_pass@1 (one greedy completion per prompt)
    at_start: bool = True                # evaluate before the first step
    reward: Literal["math", "exact_match"] = "math"


@dataclass
class PEARConfig:
    level: Literal["token", "block", "sequence"] = "token"
    block_size: PositiveInt = 4
    gamma: Fraction = 0.999
    log_ratio_clip_low: float = -0.08
    log_ratio_clip_high: float = 0.3
    log_weight_clip_low: float = -10.0
    log_weight_clip_high: float = 5.0
    normalize: Literal["tokens", "sequences"] = "tokens"


@dataclass
class GRPOConfig:
    num_generations: PositiveInt = 8     # completions per prompt (the group)
    temperature: Positive = 1.0          # sampling and training temperature
    reward: Literal["math", "exact_match"] = "math"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    clip_low: Below1 = 0.2
    clip_high: NonNegative = 0.2         # DAPO clip-higher: 0.28
    dual_clip: float | None = None       # None: off; else c > 1 (e.g. 3.0)
    kl_coef: NonNegative = 0.0           # > 0 loads a frozen copy of the initial model
    kl_estimator: Literal["k1", "k2", "k3", "low_var_kl", "k1+", "low_var_kl+"] = "k3"  # see losses.kl_penalty
    entropy_coef: float = 0.0
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    num_iterations: PositiveInt = 1      # optimizer steps per generated batch
    is_cap: Positive | None = None       # truncated importance sampling cap (> 0) vs the engine's logprobs
    is_level: Literal["token", "sequence"] = "token"


@dataclass
class Config:
    recipe: Literal["sft", "osft", "pear", "grpo"] = "osft"
    run_dir: str = "runs/default"
    seed: Seed = 0
    epochs: Positive = 1.0               # passes over the training prompts
    max_steps: Count = 0                 # stop after this many optimizer steps (0: no limit)
    max_rollout_tokens: Count = 0        # also stop after the batch where this many tokens were generated (0: no limit)
    prompts_per_step: PositiveInt = 8
    save_every: Count = 0                # checkpoint every N steps (0: only at the end)
    keep_last: Count = 2                 # checkpoints kept (0: none are written)
    resume: Literal["auto", "never"] = "auto"  # never: a run_dir holding checkpoints is refused
    resume_changed: Literal["refuse", "allow"] = "refuse"  # allow: resume with a changed training config
    log_every: PositiveInt = 1
    tensorboard: bool = False            # also write metrics to run_dir/tensorboard
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    osft: OSFTConfig = field(default_factory=OSFTConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    pear: PEARConfig = field(default_factory=PEARConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


_PATHS = ("run_dir", "model.path", "data.train", "eval.data")  # ~ and $VARS are expanded


def _convert(value, kind, key: str):
    origin = typing.get_origin(kind)
    if origin is Annotated:  # a numeric field with its Range
        base, *ranges = typing.get_args(kind)
        value = _convert(value, base, key)
        for allowed in ranges:
            if not allowed.test(value):
                raise ConfigError(f"{key} must be {allowed.says}, got {value!r}")
        return value
    if origin is Literal:
        if isinstance(value, bool):  # YAML reads off/on, no/yes as booleans: the word is meant
            value = next((word for word in typing.get_args(kind) if isinstance(word, str)
                          and word in (("on", "yes", "true") if value else ("off", "no", "false"))), value)
        if value not in typing.get_args(kind):
            raise ConfigError(f"{key} must be one of {list(typing.get_args(kind))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(kind):
            return None
        return _convert(value, next(a for a in typing.get_args(kind) if a is not type(None)), key)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {kind.__name__} fields, got {value!r}")
        return _build(kind, value, key + ".")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {kind}")  # a programming error in this module


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls, include_extras=True)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known keys of {prefix or 'the config'}: "
                          f"{', '.join(sorted(hints))})")
    values = {}
    for name, kind in hints.items():
        if name in data:
            key = prefix + name
            value = _convert(data[name], kind, key)
            if key in _PATHS and value:
                value = os.path.expandvars(os.path.expanduser(value))
            values[name] = value
    return cls(**values)


def _set_dotted(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The configuration in YAML file ``path`` (or the defaults), with ``key.sub=value`` overrides
    (values parsed as YAML: ``optim.lr=1e-5``, ``model.gradient_checkpointing=true``)."""
    data = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        changes[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return config_from_dict(data, changes)


def config_from_dict(data: dict, changes: dict | None = None) -> Config:
    """The configuration in nested mappings ``data`` (as YAML gives them), with ``changes`` to dotted
    keys (``{"optim.lr": 1e-5}``); every key, type and range checked, as for a file."""
    for key, value in (changes or {}).items():
        _set_dotted(data, key, value)
    config = _build(Config, data)
    if not config.model.path:
        raise ConfigError("model.path is required: a local transformers model directory, or smollm2-135m / "
                          "gemma3-270m")
    if not config.data.train:
        raise ConfigError("data.train is required: a .jsonl or .parquet file")
    pear = config.pear
    if pear.log_ratio_clip_low > pear.log_ratio_clip_high or pear.log_weight_clip_low > pear.log_weight_clip_high:
        raise ConfigError("pear needs each clip's low <= high (pear.log_ratio_clip_*, pear.log_weight_clip_*)")
    if config.grpo.dual_clip is not None and config.grpo.dual_clip <= 1:
        raise ConfigError(f"grpo.dual_clip must be null (off) or > 1, got {config.grpo.dual_clip}")
    if config.osft.tau_s_start > config.osft.tau_t:
        raise ConfigError(f"osft.tau_s_start ({config.osft.tau_s_start}) above osft.tau_t ({config.osft.tau_t}) "
                          "trains toward a flatter distribution; OSFT needs tau_s <= tau_t")
    if config.rollout.engine == "vllm" and config.rollout.autocast == "bfloat16":
        raise ConfigError("rollout.autocast applies to the hf engine; vLLM generates in model.dtype "
                          "(set model.dtype=bfloat16 there)")
    if config.recipe == "grpo" and config.grpo.num_generations < 2:
        raise ConfigError(f"grpo.num_generations must be >= 2 (GRPO compares the rollouts of a group), "
                          f"got {config.grpo.num_generations}")
    return config


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
