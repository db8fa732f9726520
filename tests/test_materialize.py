"""Meta-device models given storage (model/materialize.py) and the packed GGUF load built on it."""
from __future__ import annotations

import torch
from torch import nn

from ros_infmllm.model.materialize import materialize


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.inner = nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_meta_tensors_get_storage_in_the_dtype_and_ties_stay_shared() -> None:
    with torch.device("meta"):
        model = Tied()
    packed = torch.arange(6, dtype=torch.uint8)
    model.inner.register_buffer("codes", packed)  # already real: left as it is
    materialize(model, torch.bfloat16)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.embed.weight.dtype == torch.bfloat16 and model.inner.bias.dtype == torch.bfloat16
    assert model.steps.dtype == torch.int64 and model.scratch.dtype == torch.bfloat16
    assert model.head.weight is model.embed.weight  # one table
    assert model.inner.codes is packed
    assert "scratch" not in model.state_dict() and "steps" in model.state_dict()
    assert isinstance(model.inner.weight, nn.Parameter)


def test_a_packed_gguf_load_gives_storage_only_to_what_stays_float(tmp_path, monkeypatch) -> None:
    """weights=auto: the projections kept in their blocks are never allocated as floats (what a
    Jetson could not hold for a 7B model); float weights allocate them all."""
    from builders import build_tiny_causal_lm
    from gguf_builders import write_text_gguf
    from ros_infmllm.model import gguf_loader, load_model
    from ros_infmllm.model.quantized import QuantizedLinear

    source = build_tiny_causal_lm(tmp_path / "hf", "qwen2", kv_heads=2, seed=4)
    file = write_text_gguf(tmp_path / "m.gguf", source.config, source.state_dict(), "Q4_0", seed=3)
    allocated: list[int] = []

    def counting(model: nn.Module, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
        tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if t.is_meta}
        allocated.append(sum(t.numel() * dtype.itemsize for t in tensors.values()))
        return materialize(model, dtype, device)

    monkeypatch.setattr(gguf_loader, "materialize", counting)
    floats = load_model(file)
    packed = load_model(file, weights="auto")
    projections = [m for m in packed.modules() if isinstance(m, QuantizedLinear)]
    # a packed projection's bias (Qwen2's q/k/v) is made when it is read, not by materialize
    float_bytes = sum(4 * (m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel()))
                      for m in projections)
    assert projections and allocated[1] == allocated[0] - float_bytes
    assert allocated[0] == sum(t.numel() * 4 for t in {id(t): t for t in floats.parameters()}.values())


def counting_materialize(allocated: list[int]):
    """``materialize`` that first records the bytes it is about to allocate."""
    def counting(model: nn.Module, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
        tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if t.is_meta}
        allocated.append(sum(t.numel() * dtype.itemsize for t in tensors.values()))
        return materialize(model, dtype, device)
    return counting


def same_codes(ours: nn.Module, reference: nn.Module) -> bool:
    """Whether two packed layers hold the same codes, scales and offsets (and bias)."""
    parts = ("qweight", "scale_bits", "offset_bits", "bias")
    return all((getattr(ours, p) is None and getattr(reference, p) is None)
               or torch.equal(getattr(ours, p), getattr(reference, p))
               for p in parts)


def test_rounding_a_float_folder_at_load_never_allocates_its_projections(tmp_path, monkeypatch) -> None:
    """weights=int8/int4 on a safetensors folder: each block projection is rounded as it is read,
    so materialize never gives it float storage (a 7B bf16 checkpoint would need 13.5 GB for that),
    and the codes are those of rounding the loaded float model (quantize_decoder), bf16 included."""
    from builders import build_tiny_causal_lm
    from ros_infmllm.model import checkpoint, load_model
    from ros_infmllm.model.quantized import QUANTIZED_PROJECTIONS, QuantizedLinear, quantize_decoder

    build_tiny_causal_lm(tmp_path, "qwen2", kv_heads=2, seed=4)
    allocated: list[int] = []
    monkeypatch.setattr(checkpoint, "materialize", counting_materialize(allocated))
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("int8", "int4"):
            allocated.clear()
            reference = load_model(tmp_path, dtype=dtype)
            quantize_decoder(reference.decoder, mode)
            packed = load_model(tmp_path, dtype=dtype, weights=mode)
            projections = [m for m in packed.modules() if isinstance(m, QuantizedLinear)]
            assert len(projections) == len(packed.decoder.layers) * len(QUANTIZED_PROJECTIONS)
            # the biases (Qwen2's q/k/v) are still given storage by materialize and loaded after
            float_bytes = sum(dtype.itemsize * m.in_features * m.out_features for m in projections)
            assert allocated[1] == allocated[0] - float_bytes, (dtype, mode)
            for name, layer in packed.named_modules():
                if isinstance(layer, QuantizedLinear):
                    assert same_codes(layer, reference.get_submodule(name)), name
            assert packed.decoder.layers[0].self_attn.q_proj.bias is not None
            ids = torch.tensor([[5, 6, 7, 8, 9]])
            assert torch.equal(packed.forward_full(ids), reference.forward_full(ids))


def test_rounding_a_float_gguf_at_load_never_allocates_its_projections(tmp_path, monkeypatch) -> None:
    """The same for a GGUF whose projections are of a type not kept packed (F16 under int4, Q4_0
    under int8): rounded as read, LLaMA's permuted q/k rows un-permuted first."""
    from builders import build_tiny_causal_lm
    from gguf_builders import write_text_gguf
    from ros_infmllm.model import gguf_loader, load_model
    from ros_infmllm.model.quantized import QuantizedLinear, quantize_decoder

    source = build_tiny_causal_lm(tmp_path / "hf", "llama", kv_heads=2, seed=4)
    for kind, mode in (("F16", "int4"), ("Q4_0", "int8")):
        file = write_text_gguf(tmp_path / f"{kind}.gguf", source.config, source.state_dict(), kind, seed=3)
        allocated: list[int] = []
        monkeypatch.setattr(gguf_loader, "materialize", counting_materialize(allocated))
        reference = load_model(file)
        quantize_decoder(reference.decoder, mode)
        packed = load_model(file, weights=mode)
        projections = [m for m in packed.modules() if isinstance(m, QuantizedLinear)]
        float_bytes = sum(4 * m.in_features * m.out_features for m in projections)
        assert projections and allocated[1] == allocated[0] - float_bytes, kind
        for name, layer in packed.named_modules():
            if isinstance(layer, QuantizedLinear):
                assert same_codes(layer, reference.get_submodule(name)), (kind, name)
