"""Make TRL's trainers (SFT, GRPO, RLOO, DPO, KTO) compute their per-token log-probabilities, entropy
and metrics with this package's fused ops instead of TRL's own fused LM head:

    import osft_kernels.integrations.trl
    osft_kernels.integrations.trl.use_fused_ops()     # before building the trainer

TRL's trainers call ``add_fused_lm_head(model, ...)`` on the policy (and reference) model and then
``model(..., labels=labels, fused_lm_head=True)``. :func:`use_fused_ops` rebinds that name in TRL to
:func:`add_fused_lm_head` here, which keeps TRL's output contract (``FusedCausalLMOutput``) and computes
it inside the model's forward with :func:`osft_kernels.linear_token_outputs` on the decoder's last hidden
states and ``lm_head`` (softcap and logit scaling from
:func:`~osft_kernels.integrations.head.output_head`). Without ``fused_lm_head=True`` the forward is the
original one, so generation is unchanged.
"""
import functools
import inspect
import sys
import types
import warnings

import torch
import trl
import trl.trainer
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from trl.trainer import utils as trl_utils

from .. import checks, token_rows
from ..api import linear_token_outputs
from .head import output_head
from .transformers import call_keywords, check_patchable, decoder_hidden_states, fused_options, router_aux_loss_coef

TESTED_VERSIONS = ("1.16",)
# TRL's trainer modules that import ``add_fused_lm_head`` (trl.trainer.<name>); any other loaded trl module
# holding TRL's function is rebound too
TRAINER_MODULES = ("sft_trainer", "grpo_trainer", "rloo_trainer", "dpo_trainer", "kto_trainer")
# TRL's per-token field -> the linear_token_outputs field that computes it
FIELDS = {"log_probs": "logprobs", "entropy": "entropy", "log_sum_sq_probs": "log_sum_sq_probs",
          "mean_logits": "mean_logit", "is_top1": "is_top1"}

_TRL_ADD_FUSED_LM_HEAD = trl_utils.add_fused_lm_head   # TRL's own, which restore() binds back


def use_fused_ops(*, backend: str = "auto", memory_budget: int | None = None, allow_untested: bool = False) -> None:
    """Rebinds ``add_fused_lm_head`` in ``trl.trainer.utils``, the ``trl.trainer`` namespace and every loaded
    TRL module that imported it (the SFT, GRPO, RLOO, DPO and KTO trainers are imported here; modules imported
    later take it from ``trl.trainer.utils``) to this package's :func:`add_fused_lm_head`. Call it before
    building the trainer; calling again replaces the options.

    ``backend``, ``memory_budget``: as in :func:`osft_kernels.linear_token_outputs`. ``allow_untested``: run
    with a TRL version other than :data:`TESTED_VERSIONS` (otherwise a RuntimeError). :func:`restore` undoes it.
    """
    checks.check_flag("allow_untested", allow_untested)
    _check_version(allow_untested)
    fused_options(backend, memory_budget)
    for name in TRAINER_MODULES:
        __import__(f"trl.trainer.{name}")
    replacement = functools.partial(add_fused_lm_head, backend=backend, memory_budget=memory_budget)
    for module in _holders():
        module.add_fused_lm_head = replacement
    trl.trainer.add_fused_lm_head = replacement


def restore() -> None:
    """Binds TRL's own ``add_fused_lm_head`` back wherever :func:`use_fused_ops` bound this package's."""
    for module in _holders():
        module.add_fused_lm_head = _TRL_ADD_FUSED_LM_HEAD


def _holders() -> list[types.ModuleType]:
    """The loaded trl modules whose ``add_fused_lm_head`` is TRL's or the one :func:`use_fused_ops` binds."""
    def held(module):
        function = module.__dict__.get("add_fused_lm_head")
        return function is _TRL_ADD_FUSED_LM_HEAD or (
            isinstance(function, functools.partial) and function.func is add_fused_lm_head)

    return [module for name, module in list(sys.modules.items())
            if (name == "trl" or name.startswith("trl.")) and isinstance(module, types.ModuleType) and held(module)]


def _check_version(allow_untested: bool) -> None:
    version = trl.__version__
    if any(version == v or version.startswith(v + ".") for v in TESTED_VERSIONS):
        return
    message = (f"osft_kernels.integrations.trl is tested with TRL {', '.join(v + '.x' for v in TESTED_VERSIONS)}, "
               f"but TRL {version} is installed")
    if not allow_untested:
        raise RuntimeError(f"{message}; install trl==1.16.0 or pass allow_untested=True")
    warnings.warn(f"{message}; running anyway (allow_untested=True)", stacklevel=3)


def add_fused_lm_head(model: nn.Module, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, backend: str = "auto",
                      memory_budget: int | None = None) -> None:
    """TRL's ``add_fused_lm_head`` contract on the fused ops: replaces ``model.forward`` (a transformers causal
    LM, before any PEFT wrapping) so that ``model(..., labels=[B, T], fused_lm_head=True)`` returns TRL's
    ``FusedCausalLMOutput`` without ``[B, T, V]`` logits.

    Its per-token fields are ``[B, T-1]`` (``[B, T]`` with pre-shifted ``shift_labels``), 0 (False) where the
    label is -100: ``log_probs``, ``entropy`` (float32, differentiable), ``log_sum_sq_probs``, ``mean_logits``
    (float32), ``is_top1`` (bool) as ``outputs`` names them (``log_probs`` always), ``label_mask`` (bool).
    ``loss = -sum(log_probs) / (num_items_in_batch or the count of non-ignored labels)``, plus
    ``router_aux_loss_coef * aux_loss`` for MoE models whose config sets ``output_router_logits``. The logits are
    divided by ``temperature`` (float > 0); ``cast_lm_head_to_fp32``: the head in float32. Other calls run the
    original forward. ``backend``, ``memory_budget``: as in :func:`osft_kernels.linear_token_outputs`.
    """
    checks.check_positive_number("temperature", temperature)
    checks.check_flag("cast_lm_head_to_fp32", cast_lm_head_to_fp32)
    if isinstance(outputs, str) or not all(name in FIELDS for name in outputs):
        raise ValueError(f"outputs must be a tuple of names among {tuple(FIELDS)}, got {outputs!r}")
    options = fused_options(backend, memory_budget)
    check_patchable(model)
    wanted = tuple(FIELDS[name] for name in ("log_probs", *outputs))
    original_forward = model.forward
    signature = inspect.signature(original_forward)

    @functools.wraps(type(model).forward)   # generate() checks its model kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            given = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **kwargs, **{k: v for k, v in given.items() if v is not None})
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels [B, T] (or pre-shifted shift_labels [B, T])")
        call = call_keywords(signature, args, kwargs)
        return _fused_output(self, lambda _model, **kw: original_forward(**kw), call,
                             shift_labels if shift_labels is not None else labels, shift_labels is None,
                             num_items_in_batch, temperature, cast_lm_head_to_fp32, wanted, options)

    model.forward = types.MethodType(forward, model)


def _fused_output(model, run_original, call: dict, labels: Tensor, shift: bool, num_items_in_batch, temperature: float,
                  cast_lm_head_to_fp32: bool, wanted: tuple[str, ...], options):
    """The ``FusedCausalLMOutput`` of one ``fused_lm_head=True`` call (see :func:`add_fused_lm_head`)."""
    call["use_cache"] = False
    if getattr(model.config.get_text_config(), "output_router_logits", False):
        call.setdefault("output_router_logits", True)
    head = output_head(model)
    weight, bias = head.weight, head.bias
    if hasattr(weight, "ds_id"):
        raise ValueError("lm_head.weight is a DeepSpeed ZeRO-3 partitioned parameter; the fused ops read it whole "
                         "and recompute the logits in backward, outside any gather: use ZeRO-1/2 or FSDP, or "
                         "osft_kernels.integrations.trl.restore() for TRL's own head")
    if isinstance(weight, DTensor):          # FSDP2: gather the head once, as TRL does
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    hidden, model_outputs = decoder_hidden_states(model, run_original, call, weight.device)
    dtype = _head_dtype(weight, cast_lm_head_to_fp32)
    hidden, labels = hidden.to(weight.device, dtype), labels.to(weight.device)
    weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
    out = linear_token_outputs(hidden, weight, labels, outputs=wanted, bias=bias,
                               temperature=temperature * head.temperature_scale, softcap=head.softcap, shift=shift,
                               backend=options.backend, memory_budget=options.memory_budget)
    label_mask = token_rows.target_mask(labels, -100, shift)
    count = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -out.logprobs.sum() / count
    aux_loss = model_outputs.get("aux_loss") if call.get("output_router_logits") else None
    if aux_loss is not None:
        loss = loss + router_aux_loss_coef(model) * aux_loss.to(loss.device)
    return trl_utils.FusedCausalLMOutput(loss=loss, log_probs=out.logprobs, entropy=out.entropy,
                                         log_sum_sq_probs=out.log_sum_sq_probs, mean_logits=out.mean_logit,
                                         is_top1=out.is_top1, label_mask=label_mask, aux_loss=aux_loss)


def _head_dtype(weight: Tensor, cast_lm_head_to_fp32: bool) -> torch.dtype:
    """The dtype of the head's GEMMs, as in TRL: float32 with ``cast_lm_head_to_fp32``, else autocast's dtype inside
    an autocast region on the weight's device (TRL's configs default to ``bf16=True``), else the weight's."""
    if cast_lm_head_to_fp32:
        return torch.float32
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype
