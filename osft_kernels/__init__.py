"""Fused linear logprobs / entropy / cross-entropy for LLM post-training, without full-vocab logits."""
from . import custom_ops  # registers the ops that torch.compile traces in place of the eager ones
from .api import LogProbs, linear_cross_entropy, linear_logprobs, linear_token_loss

__all__ = ["LogProbs", "linear_cross_entropy", "linear_logprobs", "linear_token_loss"]
__version__ = "0.1.0"
