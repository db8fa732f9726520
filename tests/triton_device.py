"""Where the Triton kernel tests run: compiled on a GPU, else in Triton's interpreter on the CPU.

Import it before any kernel module: on a machine without CUDA it sets ``TRITON_INTERPRET``, which
Triton reads when a kernel is first defined."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton's interpreter computes bfloat16 dot products wrongly (its own limitation, seen with Triton
# 3.5), so bfloat16 is checked on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
