"""Setuptools entry point; the package metadata lives in pyproject.toml.

The optional C++/CUDA extensions under csrc/ will be declared here as ``ext_modules``; until then
the distribution is pure Python and installs with only torch.
"""
from setuptools import setup

setup()
