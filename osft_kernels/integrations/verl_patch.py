"""Importing this module makes verl's fused forwards run :func:`osft_kernels.integrations.verl.linear_cross_entropy`
in place of verl's Triton kernel. In a verl config::

    actor_rollout_ref.model.external_lib=osft_kernels.integrations.verl_patch
    actor_rollout_ref.model.use_fused_kernels=True
    actor_rollout_ref.model.fused_kernel_options.impl_backend=triton

verl imports ``external_lib`` in every worker when it builds the model config, before the model forward
is patched. Needs verl installed.
"""
from .verl import patch_verl

patch_verl()
