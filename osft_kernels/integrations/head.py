"""A causal LM's output layer as the fused ops take it: weight, bias, final softcap, and the model's
constant logit scaling folded into the temperature."""
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class OutputHead:
    """``logits = softcap(hidden @ weight.T + bias) / temperature_scale``, as the fused ops take it.

    ``weight``: ``[V, D]``; ``bias``: ``[V]`` or None. ``temperature_scale`` folds a model's constant
    logit scaling (Cohere's ``logit_scale``, Granite's ``logits_scaling``) into the loss
    temperature: pass ``tau * temperature_scale``.
    """

    weight: Tensor
    bias: Tensor | None
    softcap: float | None
    temperature_scale: float


def output_head(model: nn.Module) -> OutputHead:
    """The output layer of a transformers causal LM (``get_output_embeddings()``, logit transforms
    read from ``model.config``); refuses heads the fused ops cannot reproduce."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"the output layer is a {type(head).__name__}, not a plain nn.Linear (e.g. a PEFT adapter "
                         f"on lm_head, which the fused loss would silently ignore, or lm_head sharded as its own "
                         f"FSDP2 unit, whose weight it cannot read whole); keep adapters off lm_head and shard "
                         f"lm_head with its parent module")
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale, scaling = 1.0, None
    if getattr(config, "logit_scale", None) is not None:       # logits * logit_scale
        scale, scaling = 1.0 / float(config.logit_scale), "logit_scale"
    if getattr(config, "logits_scaling", None) is not None:    # logits / logits_scaling
        scale, scaling = float(config.logits_scaling), "logits_scaling"
    unknown = [name for name in ("output_multiplier", "lm_head_multiplier") if getattr(config, name, None) is not None]
    if getattr(config, "model_type", None) == "hyperclovax" and scaling == "logits_scaling":
        unknown.append("logits_scaling (which HyperCLOVA X multiplies by)")
    if unknown:
        raise ValueError(f"the config sets {', '.join(unknown)}, a logit scaling the fused ops do not reproduce; "
                         f"supported: logit_scale (Cohere), logits_scaling (Granite), final_logit_softcapping")
    if softcap is not None and scale != 1.0:
        raise ValueError(f"a model with both logit scaling and final-logit softcapping is not supported: its config "
                         f"sets {scaling}={getattr(config, scaling)} and final_logit_softcapping={softcap}, and the "
                         f"order in which its forward applies them is unknown")
    return OutputHead(head.weight, head.bias, float(softcap) if softcap else None, scale)
