"""``osft``: a thin single-node training loop on the :mod:`osft_kernels` fused losses.

``osft train CONFIG.yaml [key.sub=value ...]`` runs a recipe (``osft``, ``sft``) on a local
transformers model: the loss always goes from the decoder's hidden states and the output layer
through the fused ops, never through full-vocabulary logits.
"""
