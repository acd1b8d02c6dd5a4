"""The training loop built on :mod:`osft_kernels`: OSFT, PEAR and GRPO recipes (in development)."""
