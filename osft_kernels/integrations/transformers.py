"""Patch a transformers causal LM so that its own forward computes the training loss, and on request
per-token logprobs and entropy, with the fused ops: no ``[tokens, vocab]`` logits.

    from osft_kernels.integrations.transformers import patch
    patch(model)        # this instance;  patch("qwen2"): the forward of every Qwen2ForCausalLM

The patched forward runs the model's original forward (so its decoder, MoE router loss and output
fields are the model's own) with ``labels`` withheld and no logit position kept, takes the decoder's
last hidden states, and applies the fused op to them and ``lm_head.weight`` (softcap and logit
scaling from :func:`~osft_kernels.integrations.head.output_head`). Everything happens inside the
model's forward, so DDP/FSDP wrappers of the model see the output layer used by the loss.
"""
import functools
import inspect
import types
import warnings
from dataclasses import dataclass, fields

import torch
import transformers
from torch import Tensor, nn
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .. import checks
from ..api import linear_cross_entropy, linear_logprobs
from ..backends import BACKENDS
from .head import OutputHead, output_head

# config.model_type -> the causal-LM class whose forward is patched; each entry is checked against the
# unpatched model by tests/integrations/test_transformers_patch.py. Other *ForCausalLM classes get the same forward
# with a warning (the generic fallback).
CAUSAL_LM_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "granite": "GraniteForCausalLM",
    "cohere": "CohereForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}


@dataclass(frozen=True)
class FusedOptions:
    """What :func:`patch` was given for the fused ops."""

    backend: str
    memory_budget: int | None


@dataclass(frozen=True)
class _Request:
    """The keywords the patched forward takes on top of the model's own (see :func:`patch`)."""

    return_token_logprobs: bool = False
    targets: Tensor | None = None
    shift_targets: Tensor | None = None
    temperature: float | Tensor | None = None
    return_entropy: bool = True
    skip_logits: bool | None = None

    @classmethod
    def pop(cls, kwargs: dict) -> "_Request":
        """Removes this request's keywords from a forward call's ``kwargs`` and checks them."""
        request = cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})
        for name in ("return_token_logprobs", "return_entropy"):
            checks.check_flag(name, getattr(request, name))
        if request.skip_logits is not None:
            checks.check_flag("skip_logits", request.skip_logits)
        if request.targets is not None and request.shift_targets is not None:
            raise ValueError("pass targets (aligned with input_ids, shifted inside) or shift_targets (already "
                             "shifted), not both")
        if not request.return_token_logprobs and (request.targets is not None or request.shift_targets is not None):
            raise ValueError("targets/shift_targets are read only with return_token_logprobs=True")
        return request


def patch(model_or_model_type, *, backend: str = "auto", memory_budget: int | None = None):
    """Make a causal LM's forward compute its loss with the fused ops.

    ``model_or_model_type``: a model instance (only its forward is replaced) or a
    ``config.model_type`` string such as ``"qwen2"`` (the class's forward, for every instance,
    existing ones included). ``backend``, ``memory_budget``: as in :func:`osft_kernels.linear_cross_entropy`.
    Patching again replaces the options; :func:`unpatch` restores the original forward. Returns
    the patched model or class.

    The patched forward, given ``labels`` (or ``shift_labels``) in training mode, returns ``loss`` =
    the model's own causal-LM loss (float32; mean over non-ignored tokens, or their sum over
    ``num_items_in_batch`` when given; ``ignore_index``, default -100; plus
    ``router_aux_loss_coef * aux_loss`` when the model returns a router loss) and ``logits=None``.
    Extra keywords:

    - ``skip_logits``: None (default: fused when ``model.training``), True (fused loss in eval too),
      False (the original forward, with logits).
    - ``return_token_logprobs=True``: also add ``log_probs`` and ``entropy`` (float32,
      differentiable, 0 at ignored targets) to the output, in any mode; ``targets`` ``[B, T]``
      aligned with ``input_ids`` and shifted inside (default ``input_ids``; outputs ``[B, T-1]``), or
      ``shift_targets`` ``[B, T]`` already shifted (outputs ``[B, T]``); ``return_entropy`` (default True).
    - ``temperature``: float, ``[B]`` per sequence, or a tensor broadcastable to the (shifted)
      targets; divides the logits of both fused outputs (default 1.0).

    Calls with neither labels in the fused mode nor the logprobs request run the original forward
    unchanged (logits included). ``logits_to_keep`` slices the positions the loss reads, as the model's
    own forward does (labels of the kept length); with ``return_token_logprobs`` it must be 0.
    """
    options = fused_options(backend, memory_budget)
    if isinstance(model_or_model_type, str):
        cls = causal_lm_class(model_or_model_type)
        replaced = _replaced(cls.__dict__.get("forward"))
        cls.forward = _fused_forward(replaced.forward if replaced else cls.forward, options, cls)
        return cls
    if isinstance(model_or_model_type, nn.Module):
        model = _base_model(model_or_model_type)
        check_patchable(model)
        replaced = _replaced(model.__dict__.get("forward"))
        own = replaced.forward if replaced else _own_forward(model)
        model.forward = types.MethodType(_fused_forward(own, options, type(model)), model)
        return model
    raise TypeError(f"model_or_model_type must be a transformers causal LM or a config.model_type string, "
                    f"got {type(model_or_model_type).__name__}")


def unpatch(model_or_model_type) -> None:
    """Restores the forward that :func:`patch` replaced on this model instance or model type's
    class; nothing happens if it is not patched."""
    if isinstance(model_or_model_type, str):
        cls = causal_lm_class(model_or_model_type)
        replaced = _replaced(cls.__dict__.get("forward"))
        if replaced:
            cls.forward = replaced.forward
        return
    model = _base_model(model_or_model_type)
    replaced = _replaced(model.__dict__.get("forward"))
    if replaced and replaced.forward is None:
        del model.forward                         # back to the class's forward
    elif replaced:
        model.forward = types.MethodType(replaced.forward, model)


def causal_lm_class(model_type: str) -> type:
    """The transformers causal-LM class that :func:`patch` patches for ``model_type``: from
    :data:`CAUSAL_LM_CLASSES`, else transformers' auto mapping (the generic fallback, with a warning)."""
    if not isinstance(model_type, str):
        raise TypeError(f"model_type must be a string such as 'llama', got {type(model_type).__name__}")
    name = CAUSAL_LM_CLASSES.get(model_type)
    if name is None:
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if name is None:
            raise ValueError(f"model_type {model_type!r} has no causal-LM class in transformers "
                             f"{transformers.__version__}; tested types: {sorted(CAUSAL_LM_CLASSES)}")
        _warn_fallback(model_type, name)
    return getattr(transformers, name)


def _warn_fallback(model_type: str, class_name: str) -> None:
    warnings.warn(f"osft_kernels: model_type {model_type!r} is not in CAUSAL_LM_CLASSES; patching {class_name} with "
                  f"the generic fallback (its decoder's last hidden states and get_output_embeddings()), which no "
                  f"test checks against this model's own loss", stacklevel=3)


def fused_options(backend, memory_budget) -> FusedOptions:
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")
    checks.backend_options(memory_budget)  # raises on a bad budget now rather than at the first step
    return FusedOptions(backend, memory_budget)


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (whose forward ends in the model's forward)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder(model: nn.Module) -> nn.Module:
    """The module whose first output is the last hidden states ``[B, T, D]`` the output layer reads."""
    decoder = getattr(model, "model", None)
    if not isinstance(decoder, nn.Module) and hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
    if not isinstance(decoder, nn.Module):
        raise TypeError(f"{type(model).__name__} has no decoder (neither a .model submodule nor get_decoder())")
    return decoder


def check_patchable(model: nn.Module) -> None:
    """Refuses models the patched forward cannot serve, before any step; warns on the fallback."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    name = CAUSAL_LM_CLASSES.get(model_type)
    if name is None or not isinstance(model, getattr(transformers, name)):
        if not type(model).__name__.endswith("ForCausalLM"):
            raise TypeError(f"model must be a transformers *ForCausalLM (or a type in CAUSAL_LM_CLASSES), "
                            f"got {type(model).__name__} with model_type {model_type!r}")
        _warn_fallback(model_type, type(model).__name__)
    _decoder(model)
    output_head(model)
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise TypeError(f"{type(model).__name__}.forward takes no logits_to_keep argument, which the patched "
                        f"forward needs to skip the logits")


@dataclass(frozen=True)
class _Replaced:
    """What a patched forward replaced: a function taking ``self`` first, or None for an instance
    that used its class's forward."""

    forward: object | None


def _replaced(forward) -> _Replaced | None:
    """What a forward made by :func:`_fused_forward` replaced, or None for any other forward."""
    return getattr(getattr(forward, "__func__", forward), "_osft_replaced", None)


def _own_forward(model: nn.Module):
    """The function of a forward set on the instance itself (e.g. by accelerate), or None."""
    own = model.__dict__.get("forward")
    if own is not None and getattr(own, "__self__", None) is not model:
        raise TypeError(f"model.forward is an instance attribute that is not a method of model "
                        f"({type(own).__name__}); patch the model before wrapping its forward")
    return getattr(own, "__func__", None)


def _fused_forward(original, options: FusedOptions, model_class: type):
    """A forward taking ``self`` first, with the fused outputs, around ``original`` (a function taking
    ``self`` first; None: the forward of ``type(self)`` at call time, for an instance patch)."""
    template = original if original is not None else model_class.forward
    signature = inspect.signature(template)
    signature = signature.replace(parameters=list(signature.parameters.values())[1:])

    @functools.wraps(template)
    def forward(self, *args, **kwargs):
        run_original = original if original is not None else type(self).forward
        request = _Request.pop(kwargs)
        call = call_keywords(signature, args, kwargs)
        has_labels = call.get("labels") is not None or call.get("shift_labels") is not None
        fused_loss = has_labels and (self.training if request.skip_logits is None else request.skip_logits)
        if not (fused_loss or request.return_token_logprobs):
            if request.temperature is not None:
                raise ValueError("temperature applies only to the fused outputs: pass labels in training mode "
                                 "(or skip_logits=True), or return_token_logprobs=True")
            return run_original(self, *args, **kwargs)
        return _fused_outputs(self, run_original, call, request, options)

    forward._osft_replaced = _Replaced(original)
    return forward


def call_keywords(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """A forward call's arguments by name (``**kwargs`` merged in); refuses extra positionals."""
    arguments = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"the patched forward takes no extra positional arguments, got {len(value)}")
        else:
            arguments[name] = value
    return arguments


def _fused_outputs(model, run_original, call: dict, request: _Request, options: FusedOptions):
    """The original forward without logits, plus the fused ``loss`` and requested logprobs."""
    labels, shift_labels = call.pop("labels", None), call.pop("shift_labels", None)
    num_items_in_batch = call.pop("num_items_in_batch", None)
    ignore_index = call.pop("ignore_index", -100)
    return_dict = call.pop("return_dict", None)
    logits_to_keep = call.pop("logits_to_keep", 0)
    keeps_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
    if not keeps_all and request.return_token_logprobs:
        raise ValueError("logits_to_keep must be 0 with return_token_logprobs=True: mark the positions to skip "
                         "with ignore_index in targets instead")
    head = output_head(model)
    hidden, outputs = decoder_hidden_states(model, run_original, call, head.weight.device)
    temperature = _temperature(request.temperature, hidden.shape[0]) * head.temperature_scale

    loss = None
    if labels is not None or shift_labels is not None:
        # as the model's forward: the loss reads the kept positions only, with labels of their length
        kept = hidden if keeps_all else slice_logits_to_keep(hidden, logits_to_keep)
        loss = _causal_lm_loss(kept, head, labels, shift_labels, num_items_in_batch, temperature, ignore_index,
                               options)
        aux_loss = outputs.get("aux_loss")
        if aux_loss is not None:
            loss = loss + router_aux_loss_coef(model) * aux_loss.to(loss.device)
    result = type(outputs)(loss=loss, **{k: v for k, v in outputs.items() if k not in ("loss", "logits")})
    if request.return_token_logprobs:
        targets = request.shift_targets if request.shift_targets is not None else request.targets
        if targets is None:
            targets = call.get("input_ids")
            if targets is None:
                raise ValueError("targets is required with return_token_logprobs=True when input_ids is not given")
        out = linear_logprobs(hidden, head.weight, targets.to(hidden.device), bias=head.bias, temperature=temperature,
                              softcap=head.softcap, ignore_index=ignore_index, return_entropy=request.return_entropy,
                              shift=request.shift_targets is None, backend=options.backend,
                              memory_budget=options.memory_budget)
        result["log_probs"] = out.logprobs
        result["entropy"] = out.entropy
    if return_dict is False or (return_dict is None and not model.config.return_dict):
        return result.to_tuple()
    return result


def decoder_hidden_states(model: nn.Module, run_original, call: dict, device: torch.device):
    """Runs ``run_original(model, **call)`` keeping no logit position (``call`` without ``logits_to_keep`` and
    ``return_dict``); returns the decoder's last hidden states ``[B, T, D]`` (in the dtype the decoder returns) and
    the forward's output dict (``aux_loss`` and the other fields of the model's own forward, no logits)."""
    captured = []
    hook = _decoder(model).register_forward_hook(lambda _module, _args, output: captured.append(output[0]))
    try:
        no_position = torch.empty(0, dtype=torch.long, device=device)
        outputs = run_original(model, **call, logits_to_keep=no_position, return_dict=True)
    finally:
        hook.remove()
    return captured[-1], outputs


def _causal_lm_loss(hidden: Tensor, head: OutputHead, labels: Tensor | None, shift_labels: Tensor | None,
                    num_items_in_batch, temperature, ignore_index: int, options: FusedOptions) -> Tensor:
    """transformers' causal-LM loss (float32 scalar) from the last hidden states ``[B, T, D]``:
    ``labels [B, T]`` are shifted here, ``shift_labels [B, T]`` are used as given."""
    targets = shift_labels if shift_labels is not None else labels
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden, head.weight, targets.to(hidden.device), bias=head.bias,
                                temperature=temperature, softcap=head.softcap, ignore_index=ignore_index,
                                reduction=reduction, shift=shift_labels is None, backend=options.backend,
                                memory_budget=options.memory_budget)
    if num_items_in_batch is None:
        return loss
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def router_aux_loss_coef(model) -> float:
    coef = getattr(model, "router_aux_loss_coef", None)
    if coef is None:
        raise ValueError(f"{type(model).__name__} returned a router aux_loss but has no router_aux_loss_coef, so "
                         f"the patched forward cannot add it to the loss as the model's forward does")
    return coef


def _temperature(temperature, batch_size: int):
    """1.0 when not given, a ``[B]`` per-sequence temperature as ``[B, 1]``; others as given."""
    if temperature is None:
        return 1.0
    if isinstance(temperature, Tensor) and temperature.ndim == 1 and temperature.shape[0] == batch_size:
        return temperature[:, None]
    return temperature
