"""Weight-only int8 / int4 projections (ros_infmllm.model.quantized): packing, GGUF blocks kept as
they are, round-to-nearest from floats, and models and sessions running on them (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import build_tiny_causal_lm
from gguf_builders import write_text_gguf
from ros_infmllm.model import load_model
from ros_infmllm.model.quantized import (QUANTIZED_PROJECTIONS, QuantizedLinear, pack_int4, quantize_decoder,
                                         weight_modes)
from ros_infmllm.session import StreamingSession


def _weights(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    w[:, 3] *= 20  # an outlier column, as real projections have
    return w


@pytest.mark.parametrize("kind,bits", [("Q8_0", 8), ("Q4_0", 4), ("Q4_1", 4)])
def test_gguf_blocks_are_re_laid_without_changing_a_value(kind: str, bits: int) -> None:
    """Ours reproduces the gguf package's own dequantization bit for bit, from the raw blocks."""
    from gguf import GGMLQuantizationType, quants

    w = _weights((12, 96))
    raw = quants.quantize(w, GGMLQuantizationType[kind])
    layer = QuantizedLinear.from_gguf_blocks(raw, kind, (12, 96))
    expected = quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(12, 96)
    assert layer.bits == bits and layer.group == 32
    assert np.array_equal(layer.dequantized().numpy(), expected)
    assert layer.packed_bytes() == raw.nbytes  # the same bytes per weight as the file
    codes = layer.codes()
    assert (codes.min() >= 0 and codes.max() <= 15) if bits == 4 else codes.dtype == torch.int8


def test_q4_k_blocks_keep_their_codes_and_round_only_the_group_scales() -> None:
    """Q4_K super-blocks (random bytes, as llama.cpp's types cannot be quantized by the gguf
    package): each weight within float16 rounding of the gguf package's dequantization, which a
    single wrong code (a whole scale) or a wrong sub-block order would exceed by far."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(6)
    blocks = rng.integers(0, 256, size=(5, 2, 144), dtype=np.uint8)  # 5 rows of 512 weights
    blocks[..., 0:2] = np.array([3e-3], np.float16).view(np.uint8)
    blocks[..., 2:4] = np.array([1e-3], np.float16).view(np.uint8)
    layer = QuantizedLinear.from_gguf_blocks(blocks.reshape(5, -1), "Q4_K", (5, 512))
    expected = quants.dequantize(blocks.reshape(5, -1), GGMLQuantizationType.Q4_K).reshape(5, 512)
    assert layer.bits == 4 and layer.group == 32 and layer.scales.shape == (5, 16)
    step = layer.scales.float().repeat_interleave(32, dim=1)
    bound = 2 ** -11 * (15 * step + layer.offsets.float().abs().repeat_interleave(32, dim=1)) + 1e-7
    error = (layer.dequantized() - torch.from_numpy(expected)).abs()
    assert bool((error <= bound).all())
    assert bool((bound < 0.5 * step)[step > 0].all())  # so a code off by one would fail


def test_q6_k_blocks_become_int8_codes_in_groups_of_16() -> None:
    """Q6_K super-blocks (random bytes, negative sub-block scales included) as int8 codes -32..31
    and one float16 scale per 16 weights: each weight within float16 rounding of the gguf
    package's dequantization, which a code off by one would exceed."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, size=(5, 2, 210), dtype=np.uint8)  # 5 rows of 512 weights
    blocks[..., 208:210] = np.array([2e-4], np.float16).view(np.uint8)
    layer = QuantizedLinear.from_gguf_blocks(blocks.reshape(5, -1), "Q6_K", (5, 512))
    expected = torch.from_numpy(quants.dequantize(blocks.reshape(5, -1), GGMLQuantizationType.Q6_K).reshape(5, 512))
    assert layer.bits == 8 and layer.group == 16 and layer.offsets is None and layer.scales.shape == (5, 32)
    codes = layer.codes()
    assert codes.min() >= -32 and codes.max() <= 31 and codes.min() < -16 and codes.max() > 16
    assert bool((layer.scales < 0).any())  # int8 scales are signed in Q6_K
    step = layer.scales.float().abs().repeat_interleave(16, dim=1)
    error = (layer.dequantized() - expected).abs()
    assert bool((error <= 2 ** -11 * 32 * step + 1e-9).all())
    assert bool((2 ** -11 * 32 * step < 0.5 * step)[step > 0].all())
    assert layer.packed_bytes() == 5 * 512 + 2 * 5 * 32  # a byte per weight and a scale per 16


def test_a_q4_k_m_gguf_loads_every_projection_packed_and_fuses_in_runs(tmp_path: Path) -> None:
    """A Q4_K_M-like file (v and down in Q6_K, the rest Q4_K): under auto every projection stays
    packed (int8 in groups of 16 beside int4 in groups of 32) and the model gives the dequantized
    file's logits; q/k/v fuse as two matrices (q and k; v), gate/up as one, and the fused model
    computes as the unfused one."""
    from ros_infmllm.model.layers import FusedRuns

    source = build_tiny_causal_lm(tmp_path / "hf", "llama", kv_heads=2, seed=4, hidden_size=256,
                                  intermediate_size=512, head_dim=64)
    file = write_text_gguf(tmp_path / "q4_k_m.gguf", source.config, source.state_dict(), "Q4_K", seed=3,
                           kinds={"v_proj": "Q6_K", "down_proj": "Q6_K"})
    floats, packed = load_model(file), load_model(file, weights="auto")
    assert weight_modes(packed.decoder) == {"int4", "int8"}
    attn, mlp = packed.decoder.layers[0].self_attn, packed.decoder.layers[0].mlp
    assert (attn.v_proj.mode, attn.v_proj.group, mlp.down_proj.mode, attn.q_proj.mode) == ("int8", 16, "int8", "int4")
    for name, layer in packed.decoder.named_modules():  # each weight within float16 rounding of its scale's product
        if isinstance(layer, QuantizedLinear):
            step = layer.scales.float().abs().repeat_interleave(layer.group, dim=1)
            offsets = 0 if layer.offsets is None else layer.offsets.float().abs().repeat_interleave(layer.group, dim=1)
            reach = step * (32 if layer.bits == 8 else 15) + offsets
            error = (layer.dequantized() - floats.decoder.get_submodule(name).weight).abs()
            assert bool((error <= 2 ** -11 * reach + 1e-7).all()), name
            with torch.no_grad():  # the float model given the packed weights' values, for the logits below
                floats.decoder.get_submodule(name).weight.copy_(layer.dequantized())
    ids = torch.tensor([[7, 20, 21, 22, 30, 31, 40, 3, 9]])
    reference = floats.forward_full(ids)
    unfused = packed.forward_full(ids)
    assert (unfused - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
    packed.decoder.fuse_projections()
    assert isinstance(attn.qkv, FusedRuns) and attn.qkv.sizes == [256, 128, 128]
    assert [part.linears for part in attn.qkv.parts] == [(attn.q_proj, attn.k_proj), (attn.v_proj,)]
    assert not isinstance(mlp.gate_up, FusedRuns)
    assert torch.allclose(packed.forward_full(ids), unfused, atol=1e-5)


def test_held_weights_say_what_auto_kept(tmp_path: Path) -> None:
    """A Q4_K file whose v is Q5_K (as in llama.cpp's Q5_K_M mix, which we do not read packed):
    under auto the held kinds show v stayed float beside int4; under int8 everything is int8; the
    head and table as asked."""
    from ros_infmllm.model.quantized import held_weights

    source = build_tiny_causal_lm(tmp_path / "hf", "llama", kv_heads=2, seed=4, hidden_size=256,
                                  intermediate_size=512, head_dim=64)
    file = write_text_gguf(tmp_path / "mix.gguf", source.config, source.state_dict(), "Q4_K", seed=3,
                           kinds={"v_proj": "Q5_K"})
    assert held_weights(load_model(file, weights="auto").decoder) == {
        "weights": "float+int4", "lm_head_weights": "float", "embedding_weights": "float"}
    assert held_weights(load_model(file, weights="int8", lm_head_weights="int8", embedding_weights="int4").decoder) == {
        "weights": "int8", "lm_head_weights": "int8", "embedding_weights": "int4"}


@pytest.mark.parametrize("mode,group", [("int8", 32), ("int8", 0), ("int4", 32), ("int4", 64)])
def test_round_to_nearest_is_within_half_a_step(mode: str, group: int) -> None:
    w = torch.from_numpy(_weights((10, 128), seed=1))
    layer = QuantizedLinear.from_float(w, None, mode, group)
    assert layer.group == (group or 128) and layer.mode == mode
    error = (layer.dequantized() - w).abs().reshape(10, -1, layer.group)
    step = layer.scales.to(torch.float32)[..., None]
    slack = 1e-3 * (0 if layer.offsets is None else layer.offsets.to(torch.float32).abs()[..., None]) + 1e-6
    assert bool((error <= 0.5 * step * (1 + 2e-3) + slack).all())
    assert error.max() > 0  # it did quantize


def test_int4_without_offsets_rounds_to_the_bytes_of_a_q4_0_file() -> None:
    """int4 rounded from floats without offsets is llama.cpp's Q4_0: the gguf package's quantizer
    gives the same codes and scales, 18 bytes per 32 weights against 20 with offsets."""
    from gguf import GGMLQuantizationType, quants

    w = _weights((12, 256), seed=5)
    w[2, 32:64] = 0.0  # an all-zero group: scale 0, every code 8
    w[4, :32] = -np.abs(w[4, :32])  # a group whose peak is negative: a positive scale
    layer = QuantizedLinear.from_float(torch.from_numpy(w), None, "int4", offsets=False)
    blocks = quants.quantize(w, GGMLQuantizationType.Q4_0)
    file = QuantizedLinear.from_gguf_blocks(blocks, "Q4_0", w.shape)
    assert layer.offsets is None and torch.equal(layer.qweight, file.qweight)
    assert torch.equal(layer.scale_bits, file.scale_bits)
    assert layer.packed_bytes() * 20 == QuantizedLinear.from_float(torch.from_numpy(w), None, "int4").packed_bytes() * 18
    error = (layer.dequantized() - torch.from_numpy(w)).abs().reshape(12, -1, 32)
    step = layer.scales.to(torch.float32).abs()[..., None]
    below_top = layer.codes().reshape(12, -1, 32) < 15  # code 15 (7 steps) also takes values up to 8 steps
    assert bool((error <= step * (1 + 2e-3) + 1e-6).all())
    assert bool((error <= 0.5 * step * (1 + 2e-3) + 1e-6)[below_top].all())
    assert bool((layer.codes()[2, 32:64] == 8).all())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_rounding_a_few_rows_at_a_time_gives_the_same_layer(mode: str, monkeypatch) -> None:
    """from_float rounds pieces of whole rows (its float32 temporaries bounded): uneven pieces give
    the codes, scales and offsets of rounding the matrix at once."""
    w = torch.from_numpy(_weights((10, 128), seed=2))
    whole = QuantizedLinear.from_float(w, None, mode)
    monkeypatch.setattr("ros_infmllm.model.quantized.ROUNDING_ELEMENTS", 3 * 128)  # pieces of 3, 3, 3, 1 rows
    pieces = QuantizedLinear.from_float(w, None, mode)
    for part in ("qweight", "scale_bits", "offset_bits"):
        a, b = getattr(whole, part), getattr(pieces, part)
        assert (a is None and b is None) or torch.equal(a, b), part


def test_packing_keeps_each_code_and_rejects_bad_shapes() -> None:
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(2, 16)
    packed = pack_int4(codes)
    assert packed.shape == (2, 8) and torch.equal(packed[0, 0], torch.tensor(0 | (1 << 4), dtype=torch.uint8))
    layer = QuantizedLinear(packed, torch.ones(2, 1), torch.zeros(2, 1), 4, 16)
    assert torch.equal(layer.codes(), codes)
    with pytest.raises(ValueError, match="group"):
        QuantizedLinear.from_float(torch.zeros(4, 40), None, "int4", 32)
    with pytest.raises(ValueError, match="weight mode"):
        QuantizedLinear.from_float(torch.zeros(4, 64), None, "int3", 32)
    with pytest.raises(ValueError, match="not read directly"):
        QuantizedLinear.from_gguf_blocks(np.zeros((4, 18), np.uint8), "Q5_0", (4, 32))


def test_a_dtype_cast_of_the_model_leaves_codes_and_scales_alone() -> None:
    layer = QuantizedLinear.from_float(torch.from_numpy(_weights((8, 64), seed=4)), None, "int4")
    before = layer.dequantized()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.dequantized(), before) and layer.scales.dtype == torch.float16


def test_quantized_linear_is_the_float64_product_of_its_weights() -> None:
    w = torch.from_numpy(_weights((24, 64), seed=2))
    bias = torch.linspace(-1, 1, 24)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    for mode in ("int8", "int4"):
        layer = QuantizedLinear.from_float(w, bias, mode)
        expected = x.double() @ layer.dequantized(torch.float64).T + bias.double()
        assert torch.allclose(layer(x).double(), expected, atol=1e-5)


@pytest.mark.parametrize("decoder,kind", [("llama", "Q4_0"), ("qwen2", "Q4_1"), ("llama", "Q8_0"), ("llama", "Q4_K")])
def test_a_gguf_loads_packed_and_computes_the_dequantized_model(decoder: str, kind: str, tmp_path: Path) -> None:
    """weights=auto keeps the file's blocks (LLaMA's permuted q/k rows and Qwen2's biases included)
    and gives the logits of the model dequantized to float32 (Q4_K: rows 256 wide, its blocks' span)."""
    wide = dict(hidden_size=256, intermediate_size=512, head_dim=64) if kind == "Q4_K" else {}
    source = build_tiny_causal_lm(tmp_path / "hf", decoder, kv_heads=2, seed=4, **wide)
    file = write_text_gguf(tmp_path / f"{decoder}.gguf", source.config, source.state_dict(), kind, seed=3)
    floats, packed = load_model(file), load_model(file, weights="auto")
    assert weight_modes(floats.decoder) == {"float"}
    assert weight_modes(packed.decoder) == {"int8" if kind == "Q8_0" else "int4"}
    if decoder == "qwen2":
        assert packed.decoder.layers[0].self_attn.q_proj.bias is not None
    ids = torch.tensor([[7, 20, 21, 22, 30, 31, 40, 3, 9]])
    reference = floats.forward_full(ids)
    # Q4_K's group scales and offsets are rounded to float16 (see _from_q4_k): relative tolerance
    tolerance = 1e-5 if kind != "Q4_K" else 3e-5 * reference.abs().max().item()
    assert (packed.forward_full(ids) - reference).abs().max().item() <= tolerance
    # asking for the other width re-quantizes from the dequantized floats instead
    other = load_model(file, weights="int8" if kind != "Q8_0" else "int4")
    assert weight_modes(other.decoder) == {"int8" if kind != "Q8_0" else "int4"}


def test_float_checkpoints_quantize_at_load_and_stay_close(tmp_path: Path) -> None:
    source = build_tiny_causal_lm(tmp_path, "qwen2", seed=5)
    floats = load_model(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    reference = floats.forward_full(ids).log_softmax(-1)
    for mode in ("int8", "int4"):
        model = load_model(tmp_path, weights=mode)
        assert weight_modes(model.decoder) == {mode}
        layers = [model.decoder.layers[0].get_submodule(p) for p in QUANTIZED_PROJECTIONS]
        assert all(isinstance(layer, QuantizedLinear) and layer.group == 32 for layer in layers)
        got = model.forward_full(ids).log_softmax(-1)
        kl = torch.nn.functional.kl_div(got, reference, log_target=True, reduction="batchmean").item()
        assert kl < (1e-3 if mode == "int8" else 2e-2), (mode, kl)
    assert isinstance(model.decoder.lm_head, torch.nn.Linear)  # embeddings and head stay float
    with pytest.raises(ValueError, match="weights must be one of"):
        load_model(tmp_path, weights="int2")
    del source


def test_quantize_decoder_leaves_packed_layers_and_counts_the_rest(tmp_path: Path) -> None:
    build_tiny_causal_lm(tmp_path, "llama", seed=6)
    model = load_model(tmp_path)
    layers = len(model.decoder.layers) * len(QUANTIZED_PROJECTIONS)
    assert quantize_decoder(model.decoder, "int4") == layers
    assert quantize_decoder(model.decoder, "int8") == 0 and weight_modes(model.decoder) == {"int4"}


def test_a_packed_lm_head_is_a_copy_and_its_product_is_chunked(tmp_path: Path, monkeypatch) -> None:
    """``head=``: the (tied) LM head packed, the embedding table left float for lookups; the model
    computes with the dequantized head, and the row-chunked reference product equals the one-shot one."""
    build_tiny_causal_lm(tmp_path, "qwen2", seed=8)
    model = load_model(tmp_path, weights="int8")
    embed = model.decoder.embed_tokens.weight.detach().clone()
    assert quantize_decoder(model.decoder, "int8", head="int4") == 1
    head = model.decoder.lm_head
    assert isinstance(head, QuantizedLinear) and head.mode == "int4"
    assert torch.equal(model.decoder.embed_tokens.weight, embed)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    got = model.forward_full(ids)
    model.decoder.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    model.decoder.lm_head.weight.data = head.dequantized()
    assert torch.allclose(got, model.forward_full(ids), atol=1e-5)
    x = torch.randn(3, head.in_features)
    whole = head(x)
    monkeypatch.setattr("ros_infmllm.model.quantized.FORWARD_ELEMENTS", 7 * head.in_features)  # uneven row chunks
    assert torch.allclose(head(x), whole, atol=1e-6)
    assert torch.equal(head.dequantized(rows=slice(7, 20)), head.dequantized()[7:20])


def test_a_session_streams_and_answers_on_int4_weights(tmp_path: Path) -> None:
    """The whole session path (prefill chunks, evictions, decode) on packed weights (exported
    graphs with packed weights: tests/test_export.py)."""
    build_tiny_causal_lm(tmp_path, "qwen2", seed=7)
    session = StreamingSession.from_pretrained(tmp_path, policy="h2o", capacity=96, max_chunk=16,
                                               template="qwen2", max_new_tokens=4, weights="int4")
    assert weight_modes(session.model.decoder) == {"int4"}
    session.feed_text("the red circle is left of the blue square " * 12)
    assert session.cache.evictions > 0 and session.cache.length <= 96
    assert isinstance(session.answer("what is left ?"), str)


def test_lm_head_weights_pack_the_head_at_load_and_are_checked(tmp_path: Path) -> None:
    build_tiny_causal_lm(tmp_path, "qwen2", seed=9, tie=True)
    floats = load_model(tmp_path)
    model = load_model(tmp_path, weights="int4", lm_head_weights="int8")
    assert isinstance(model.decoder.lm_head, QuantizedLinear) and model.decoder.lm_head.mode == "int8"
    assert torch.equal(model.decoder.embed_tokens.weight, floats.decoder.embed_tokens.weight)  # the table stays float
    assert weight_modes(model.decoder) == {"int4"}
    ids = torch.tensor([[5, 6, 7, 8]])
    kl = torch.nn.functional.kl_div(model.forward_full(ids).log_softmax(-1), floats.forward_full(ids).log_softmax(-1),
                                    log_target=True, reduction="batchmean").item()
    assert kl < 2e-2
    with pytest.raises(ValueError, match="lm_head_weights must be one of"):
        load_model(tmp_path, lm_head_weights="int2")


def test_a_packed_base_with_lora_factors_adds_their_product_and_is_not_fused(tmp_path: Path) -> None:
    """packed_lora.PackedLoRALinear against a float64 reference of W_base + B @ A; fusing it with
    its neighbours is declined (it runs on its own), and a packed_base.json naming a missing
    file fails with the file's name."""
    from ros_infmllm.errors import CheckpointError
    from ros_infmllm.model.layers import fuse_linears
    from ros_infmllm.model.packed_lora import PACKED_BASE_FILE, PackedLoRALinear, attach_packed_base

    torch.manual_seed(0)
    base = QuantizedLinear.from_float(torch.randn(48, 64), None, "int4")
    a, b = torch.randn(4, 64) * 0.1, torch.randn(48, 4) * 0.1
    layer = PackedLoRALinear(base, a, b)
    x = torch.randn(5, 64)
    reference = x.double() @ (base.dequantized(torch.float64) + b.double() @ a.double()).T
    assert (layer(x).double() - reference).abs().max() <= 1e-4 and layer.mode == "int4+lora"
    assert fuse_linears(torch.nn.Module(), "qkv", (layer, layer, layer)) is None
    with pytest.raises(CheckpointError, match="do not fit"):
        PackedLoRALinear(base, a[:, :32], b)
    (tmp_path / PACKED_BASE_FILE).write_text(json.dumps({"gguf": str(tmp_path / "gone.gguf"),
                                                          "lora": str(tmp_path / "gone.safetensors"),
                                                          "lora_alpha": 8.0}))
    with pytest.raises(CheckpointError, match="gone.gguf is missing"):
        attach_packed_base(torch.nn.Module(), tmp_path, torch.float32)
