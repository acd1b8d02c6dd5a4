"""Fused linear logprobs / entropy / cross-entropy for LLM post-training, without full-vocab logits."""
from . import custom_ops  # noqa: F401 (registers the ops that torch.compile traces in place of the eager ones)
from .api import (
    LogProbs,
    TokenOutputs,
    linear_cross_entropy,
    linear_logprobs,
    linear_token_loss,
    linear_token_outputs,
)
from .backends import BACKENDS, backend_name
from .token_rows import target_mask, target_shape

__all__ = ["BACKENDS", "LogProbs", "TokenOutputs", "backend_name", "linear_cross_entropy", "linear_logprobs",
           "linear_token_loss", "linear_token_outputs", "target_mask", "target_shape"]
__version__ = "0.1.0"
