"""Post-training objectives on top of the fused ops: SFT/OSFT, PEAR and the GRPO family.

Each objective is plain PyTorch on per-token logprobs (or one fused cross-entropy call), so the
math exists once and runs the same on every backend.
"""
from .aggregation import AGGREGATIONS, NORMALIZATIONS, aggregate, aggregation_weights, count_items, ddp_num_items
from .grpo import KL_ESTIMATORS, group_advantages, grpo_loss, kl_penalty, policy_loss, truncated_importance_weights
from .pear import pear_loss, pear_weights
from .sft import sampling_temperature, sft_loss

__all__ = [
    "AGGREGATIONS", "KL_ESTIMATORS", "NORMALIZATIONS", "aggregate", "aggregation_weights", "count_items",
    "ddp_num_items", "group_advantages",
    "grpo_loss", "kl_penalty", "pear_loss", "pear_weights", "policy_loss", "sampling_temperature", "sft_loss",
    "truncated_importance_weights",
]
