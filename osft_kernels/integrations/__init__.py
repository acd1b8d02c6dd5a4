"""Integrations of the fused ops with model libraries; each submodule imports its library itself
(``osft_kernels.integrations.transformers`` needs ``transformers``). ``head`` reads a causal LM's output layer
as the fused ops take it, ``transformers`` patches the model's forward to use them. ``verl`` is a drop-in for verl's
fused logprobs/entropy kernel, and importing ``verl_patch`` (verl's ``external_lib``) switches verl to it. ``trl``:
``use_fused_ops()`` makes TRL's trainers use the fused ops in place of TRL's own fused LM head."""
