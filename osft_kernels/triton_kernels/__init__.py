"""Triton kernels for the row statistics and their gradients (see :mod:`osft_kernels.backends.triton_chunked`).

Importing this package imports ``triton``; :mod:`osft_kernels` itself only does so when the triton
backend is used.
"""
