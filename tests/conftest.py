"""Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors. The switch must
be set before the kernels are decorated, i.e. before ``osft_kernels.triton_kernels`` is imported.

The training-loop tests share one tiny model directory and one data file per session (read-only: a
test that changes them works on a copy)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from helpers.tiny_lm import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    from helpers.tiny_lm import arithmetic_rows, write_rows
    return write_rows(tmp_path_factory.mktemp("data") / "train.jsonl", arithmetic_rows())
