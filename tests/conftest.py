"""Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors. The switch must
be set before the kernels are decorated, i.e. before ``osft_kernels.triton_kernels`` is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
