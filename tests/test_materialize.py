"""Meta-device models given storage (model/materialize.py) and the packed GGUF load built on it."""
from __future__ import annotations

import pytest
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


def test_a_gguf_head_and_table_are_packed_as_read_from_their_own_blocks(tmp_path, monkeypatch) -> None:
    """lm_head_weights / embedding_weights packed on a GGUF: materialize never gives the head or the
    table float storage; a Q6_K head under int8 keeps its blocks (groups of 16, not rounded again to
    groups of 32), a Q8_0 table under int8 its codes exactly, and under int4 the table is rounded
    from its values as quantize_embeddings rounds the loaded table; the logits are the float
    model's given those values."""
    from builders import build_tiny_causal_lm
    from gguf_builders import write_text_gguf
    from ros_infmllm.model import gguf_loader, load_model
    from ros_infmllm.model.quantized import QuantizedLinear
    from ros_infmllm.model.quantized_embedding import QuantizedEmbedding

    source = build_tiny_causal_lm(tmp_path / "hf", "llama", kv_heads=2, seed=4, hidden_size=256,
                                  intermediate_size=512, head_dim=64)
    file = write_text_gguf(tmp_path / "m.gguf", source.config, source.state_dict(), "Q4_0", seed=3,
                           kinds={"lm_head": "Q6_K", "embed_tokens": "Q8_0"})
    allocated: list[int] = []
    monkeypatch.setattr(gguf_loader, "materialize", counting_materialize(allocated))
    floats = load_model(file)
    packed = load_model(file, lm_head_weights="int8", embedding_weights="int8")
    head, embed = packed.decoder.lm_head, packed.decoder.embed_tokens
    assert isinstance(head, QuantizedLinear) and isinstance(embed, QuantizedEmbedding) and embed.table is not head
    vocab, hidden = floats.decoder.embed_tokens.weight.shape
    assert allocated[1] == allocated[0] - 2 * 4 * vocab * hidden  # neither float matrix was given storage
    assert (head.mode, head.group, embed.table.group) == ("int8", 16, 32)
    reach = head.scales.float().abs().repeat_interleave(16, dim=1) * 32  # Q6_K: d * sc rounded to float16
    assert bool(((head.dequantized() - floats.decoder.lm_head.weight).abs() <= 2 ** -11 * reach + 1e-7).all())
    assert torch.equal(embed.table.dequantized(), floats.decoder.embed_tokens.weight)  # Q8_0: the same codes
    with torch.no_grad():
        floats.decoder.lm_head.weight.copy_(head.dequantized())
    ids = torch.tensor([[7, 20, 21, 22, 30, 31, 40, 3, 9]])
    reference = floats.forward_full(ids)
    assert (packed.forward_full(ids) - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
    rounded = load_model(file, embedding_weights="int4")  # Q8_0 under int4: rounded from the table's values
    assert same_codes(rounded.decoder.embed_tokens.table,
                      QuantizedLinear.from_float(floats.decoder.embed_tokens.weight, None, "int4"))
    assert allocated[2] == allocated[0] - 4 * vocab * hidden


def test_a_tied_table_packed_as_read_is_the_heads_codes(tmp_path, monkeypatch) -> None:
    """A tied GGUF (SmolLM2's layout: one Q8_0 table) and a tied bf16 folder: head and table packed
    alike are one packed matrix (the GGUF's own Q8_0 codes; the folder's rounded from its values)
    and the float table is never allocated; a packed head beside a float
    table reads the table's tensor; a packed table beside a float head is refused before the load."""
    from builders import build_tiny_causal_lm
    from gguf_builders import write_text_gguf
    from ros_infmllm.model import checkpoint, gguf_loader, load_model
    from ros_infmllm.model.quantized import QuantizedLinear, quantize_head

    source = build_tiny_causal_lm(tmp_path / "hf", "qwen2", kv_heads=2, seed=9, tie=True)
    file = write_text_gguf(tmp_path / "tied.gguf", source.config, source.state_dict(), "Q8_0", seed=3)
    for path, module in ((file, gguf_loader), (tmp_path / "hf", checkpoint)):
        allocated: list[int] = []
        monkeypatch.setattr(module, "materialize", counting_materialize(allocated))
        floats = load_model(path, dtype=torch.bfloat16)
        packed = load_model(path, dtype=torch.bfloat16, lm_head_weights="int8", embedding_weights="int8")
        vocab, hidden = floats.decoder.embed_tokens.weight.shape
        assert packed.decoder.embed_tokens.table is packed.decoder.lm_head
        # a folder's float load gives the tied head storage of its own too, until load_state ties it
        matrices = 1 if module is gguf_loader else 2
        assert allocated[1] == allocated[0] - matrices * 2 * vocab * hidden, path  # bf16 tables
        if module is gguf_loader:  # the file's Q8_0 codes and scales, not a rounding of their bf16 values
            table = load_model(path).decoder.embed_tokens.weight
            assert torch.equal(packed.decoder.lm_head.dequantized(torch.float32), table)
        else:  # what the load did before: round the loaded table
            reference = load_model(path, dtype=torch.bfloat16)
            quantize_head(reference.decoder, "int8")
            assert same_codes(packed.decoder.lm_head, reference.decoder.lm_head)
        ids = torch.tensor([[5, 6, 7, 8]])
        assert torch.equal(packed.decoder.embed_tokens(ids)[0], packed.decoder.lm_head.dequantized(torch.bfloat16)[ids[0]])
        assert packed.decoder.embed_tokens(ids).dtype == torch.bfloat16
        head_only = load_model(path, lm_head_weights="int4")
        assert isinstance(head_only.decoder.lm_head, QuantizedLinear)
        assert torch.equal(head_only.decoder.embed_tokens.weight, load_model(path).decoder.embed_tokens.weight)
        allocated.clear()
        with pytest.raises(ValueError, match="tied to a float LM head"):
            load_model(path, embedding_weights="int8")
        assert allocated == []  # refused before any storage was given


def test_a_folders_head_and_table_are_rounded_as_read(tmp_path, monkeypatch) -> None:
    """An untied bf16 safetensors folder: the head and table packed at load are rounded from their
    tensors as read (the codes of rounding the loaded floats), never allocated as floats; a folder
    without its head tensor is refused by name."""
    from safetensors.torch import load_file, save_file

    from builders import build_tiny_causal_lm
    from ros_infmllm.errors import CheckpointError
    from ros_infmllm.model import checkpoint, load_model
    from ros_infmllm.model.quantized import quantize_head
    from ros_infmllm.model.quantized_embedding import quantize_embeddings

    build_tiny_causal_lm(tmp_path, "llama", kv_heads=2, seed=5, tie=False)
    allocated: list[int] = []
    monkeypatch.setattr(checkpoint, "materialize", counting_materialize(allocated))
    reference = load_model(tmp_path, dtype=torch.bfloat16)
    packed = load_model(tmp_path, dtype=torch.bfloat16, weights="int4", lm_head_weights="int8",
                        embedding_weights="int4")
    vocab, hidden = reference.decoder.embed_tokens.weight.shape
    floats = load_model(tmp_path, dtype=torch.bfloat16, weights="int4")
    assert allocated[1] == allocated[2] - 2 * 2 * vocab * hidden
    quantize_head(floats.decoder, "int8")
    quantize_embeddings(floats.decoder, "int4")
    assert same_codes(packed.decoder.lm_head, floats.decoder.lm_head)
    assert same_codes(packed.decoder.embed_tokens.table, floats.decoder.embed_tokens.table)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(packed.forward_full(ids), floats.forward_full(ids))
    shard = tmp_path / "model.safetensors"
    tensors = load_file(str(shard))
    del tensors["lm_head.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head.weight'"):
        load_model(tmp_path, lm_head_weights="int8")


def test_a_gguf_matrix_read_a_piece_of_rows_at_a_time_equals_the_whole_read(tmp_path) -> None:
    """RowsAsRead (what rounding at load reads): pieces cut anywhere, across heads too, give the rows
    of the whole tensor dequantized, LLaMA's q rows un-permuted; F16 and Q4_0 blocks."""
    from builders import build_tiny_causal_lm
    from gguf_builders import write_text_gguf
    from ros_infmllm.model.gguf_file import open_gguf
    from ros_infmllm.model.gguf_loader import RowsAsRead
    from ros_infmllm.model.gguf_text import unpermute_qk

    source = build_tiny_causal_lm(tmp_path / "hf", "llama", kv_heads=2, seed=4)
    heads = source.config.num_attention_heads
    for kind in ("F16", "Q4_0"):
        file = open_gguf(write_text_gguf(tmp_path / f"{kind}.gguf", source.config, source.state_dict(), kind, seed=3))
        for name, permuted in (("blk.0.attn_q.weight", heads), ("blk.1.ffn_down.weight", 0)):
            whole = file.tensor(name)
            whole = unpermute_qk(whole, permuted) if permuted else whole
            rows = RowsAsRead(file, name, torch.bfloat16, permuted)
            assert rows.shape == whole.shape and file.reads_rows(name)
            cuts = [0, 3, 8, 9, 21, whole.shape[0]]  # 8 rows a head in q: cuts inside and on heads
            pieces = torch.cat([rows[a:b] for a, b in zip(cuts, cuts[1:])])
            assert pieces.dtype == torch.bfloat16 and torch.equal(pieces, whole.to(torch.bfloat16)), (kind, name)
