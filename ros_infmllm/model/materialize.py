"""Meta-device models given storage only where they need it.

Why: a model built on the meta device and then ``to_empty(device).to(dtype)`` first holds every
tensor in float32 and then a second copy in ``dtype``; and a loader that replaces projections by
packed layers (``gguf_loader.py``) would still allocate the float layers it throws away. Loading a
packed 7B model must not need its float copy's memory (a Jetson has no such room).
"""
from __future__ import annotations

import torch
from torch import nn


def materialize(model: nn.Module, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """Give every parameter and buffer still on the meta device uninitialised storage on
    ``device``, floating-point ones in ``dtype``; tensors that already hold data (packed layers
    registered before) are left as they are, and a tensor shared by two modules (a tied LM head)
    stays shared. Returns ``model``."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (meta tensor, kept alive so ids stay unique; real)

    def real(tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(tensor, device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                if id(param) not in made:
                    made[id(param)] = param, nn.Parameter(real(param), requires_grad=param.requires_grad)
                setattr(module, name, made[id(param)][1])
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                if id(buffer) not in made:
                    made[id(buffer)] = buffer, real(buffer)
                module.register_buffer(name, made[id(buffer)][1],
                                       persistent=name not in module._non_persistent_buffers_set)
    return model
