"""GGUF checkpoints and text-only models against `transformers` (fp32, <= 1e-4).

Text GGUFs are written by the tests from small random transformers models in several tensor
types and compared with transformers' own GGUF loading of the same file; mmproj pairs are
compared with the LLaVA model they were written from.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from builders import IMAGE_TOKEN, TinySpec, build_tiny_causal_lm, build_tiny_llava, image_tokens_per_frame
from gguf_builders import K_TYPES, finish, write_mmproj_gguf, write_text_gguf
from ros_infmllm.errors import CheckpointError
from ros_infmllm.model import CausalLM, LlavaModel, load_model, locate
from ros_infmllm.session import StreamingSession

PROMPTS = [[7, 20, 21, 22, 30, 31, 40], [10, 11, 25, 26, 5, 6, 33, 34, 35, 36, 37, 50, 60]]
BLOCK_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def _transformers_gguf(folder: Path, name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def _assert_same_logits(ours: torch.nn.Module, reference: torch.nn.Module, prompts=PROMPTS) -> None:
    for ids in prompts:
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([ids])).logits
        got = ours.forward_full(torch.tensor([ids]))
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-4, ids


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", BLOCK_TYPES)
def test_text_gguf_logits_match_transformers_gguf_loading(decoder: str, kind: str, tmp_path: Path) -> None:
    source = build_tiny_causal_lm(tmp_path / "hf", decoder, kv_heads=2, tie=decoder == "qwen2", seed=1)
    file = write_text_gguf(tmp_path / f"{decoder}-{kind}.gguf", source.config, source.state_dict(), kind)
    ours = load_model(file)
    assert isinstance(ours, CausalLM) and not ours.has_vision
    _assert_same_logits(ours, _transformers_gguf(tmp_path, file.name))
    if kind == "F32":  # unquantized, the file is the source model itself
        _assert_same_logits(ours, source)


def test_llama_gguf_with_attention_biases_matches_its_source(tmp_path: Path) -> None:
    """transformers' GGUF loading drops LLaMA's attention biases, so the source model is the reference."""
    source = build_tiny_causal_lm(tmp_path, "llama", kv_heads=1, attention_bias=True, seed=11)
    ours = load_model(write_text_gguf(tmp_path / "biased.gguf", source.config, source.state_dict()))
    assert ours.cfg.text.qkv_bias and ours.cfg.text.o_bias
    _assert_same_logits(ours, source)


@pytest.mark.parametrize("kind", K_TYPES)
def test_k_quant_gguf_logits_match_transformers_gguf_loading(kind: str, tmp_path: Path) -> None:
    # K-quant blocks span 256 values per row, so the rows are 256 wide here.
    source = build_tiny_causal_lm(tmp_path / "hf", "llama", kv_heads=2, hidden_size=256, intermediate_size=512,
                                  head_dim=64, seed=2)
    file = write_text_gguf(tmp_path / f"llama-{kind}.gguf", source.config, source.state_dict(), kind, seed=3)
    _assert_same_logits(load_model(file), _transformers_gguf(tmp_path, file.name))


MMPROJ_SPECS = {
    # LLaVA-1.5 style: CLIP, the second-to-last layer, class token dropped
    "clip-llama": (TinySpec(tower="clip", decoder="llama", kv_heads=2, qkv_bias=False, seed=4), False),
    # SigLIP reads every patch (strategy full), from two hidden states; older mlp tensor names
    "siglip-qwen2-legacy-names": (TinySpec(feature_layer=[-3, -1], strategy="full", seed=5), True),
}


@pytest.mark.parametrize("name", list(MMPROJ_SPECS))
def test_mmproj_pair_matches_llava(name: str, tmp_path: Path) -> None:
    spec, legacy = MMPROJ_SPECS[name]
    reference = build_tiny_llava(tmp_path / "hf", spec)
    text = write_text_gguf(tmp_path / "model.gguf", reference.config.text_config, reference.state_dict())
    mmproj = write_mmproj_gguf(tmp_path / "mmproj-model.gguf", reference, legacy_mlp_names=legacy)
    ours = load_model(tmp_path)  # the folder: one text GGUF and one mmproj*.gguf
    assert isinstance(ours, LlavaModel) and ours.cfg.image_token_index == IMAGE_TOKEN
    assert locate(text, mmproj).mmproj == mmproj
    n = image_tokens_per_frame(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    for ids, images in (([7] + [IMAGE_TOKEN] * n + [20, 21, 22, 5, 6], 1),
                        ([4] + [IMAGE_TOKEN] * n + [4] + [IMAGE_TOKEN] * n + [5, 33, 6], 2), ([7, 20, 21], 0)):
        pixels = torch.randn(images, 3, spec.image_size, spec.image_size, generator=generator) if images else None
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
        got = ours.forward_full(torch.tensor([ids]), pixels)
        assert (got - expected).abs().max().item() <= 1e-4, (name, images)


def test_text_only_safetensors_checkpoints_load(tmp_path: Path) -> None:
    for decoder, tie in (("llama", True), ("qwen2", False)):
        folder = tmp_path / decoder
        reference = build_tiny_causal_lm(folder, decoder, tie=tie, seed=6)
        ours = load_model(folder)
        assert type(ours) is CausalLM
        _assert_same_logits(ours, reference)


def test_text_session_feeds_text_and_refuses_frames(tmp_path: Path) -> None:
    build_tiny_causal_lm(tmp_path, "qwen2", seed=7)
    session = StreamingSession.from_pretrained(tmp_path, policy="streamingllm", capacity=96, max_chunk=16,
                                               template="qwen2", max_new_tokens=4)
    fed = session.feed_text("what is in view ? the red circle " * 20)
    assert fed == 160 and session.stats.text_tokens_fed == 160
    assert session.cache.length <= 96  # the stream went past the capacity and was evicted
    before = session.cache.length
    with pytest.raises(ValueError, match="text-only"):
        session.ingest_frame(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        session.feed_text("")
    assert session.cache.length == before
    assert isinstance(session.answer("what is the colour of the circle ?"), str)


def test_gguf_session_answers_as_the_safetensors_session(tmp_path: Path) -> None:
    """The same weights as a safetensors folder and as a GGUF (with the folder's tokenizer.json
    beside it) stream and answer identically."""
    source = build_tiny_causal_lm(tmp_path, "llama", seed=8)
    (tmp_path / "gguf").mkdir()
    write_text_gguf(tmp_path / "gguf" / "model.gguf", source.config, source.state_dict())
    (tmp_path / "gguf" / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    answers = []
    for path in (tmp_path, tmp_path / "gguf" / "model.gguf"):
        session = StreamingSession.from_pretrained(path, policy="inf-mllm", capacity=64, max_chunk=16,
                                                   template="qwen2", max_new_tokens=6)
        session.feed_text("the red circle is left of the blue square " * 6)
        answers.append(session.answer("what is left ?"))
    assert answers[0] == answers[1]


def test_gguf_template_and_tokenizer_come_from_the_file(tmp_path: Path) -> None:
    source = build_tiny_causal_lm(tmp_path / "hf", "qwen2", seed=9)
    file = write_text_gguf(tmp_path / "model.gguf", source.config, source.state_dict())
    session = StreamingSession.from_pretrained(file, capacity=64, max_chunk=16)
    assert session.template.name == "chat"  # derived from the file's ChatML template
    assert session.template.query == "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
    assert session.tokenizer.token_to_id("<|im_end|>") == 11
    assert session.tokenizer.encode("<|im_start|>").ids == [10]  # a control token is one id


def test_an_opened_file_holds_its_vocabulary_as_plain_lists(tmp_path: Path) -> None:
    """The tokenizer's arrays leave the reader's parsed fields (two numpy views per string, about
    160 MB for SmolLM2's vocabulary, held while the file stays cached) for plain lists with the
    same values, which get / require / tokens answer from."""
    from gguf import GGUFReader

    from ros_infmllm.model.gguf_file import TOKENIZER_ARRAYS, GGUFFile

    source = build_tiny_causal_lm(tmp_path / "hf", "qwen2", seed=9)
    file = write_text_gguf(tmp_path / "model.gguf", source.config, source.state_dict())
    reference = GGUFReader(str(file)).fields
    opened = GGUFFile(file)
    held = [key for key in TOKENIZER_ARRAYS if key in reference]
    assert "tokenizer.ggml.tokens" in held and "tokenizer.ggml.token_type" in held
    for key in held:
        assert key not in opened.reader.fields and isinstance(opened.arrays[key], list)
        assert opened.get(key) == reference[key].contents() == opened.require(key)
    assert opened.tokens == reference["tokenizer.ggml.tokens"].contents()
    assert opened.get("general.architecture") == "qwen2"  # other metadata still from the reader
    with pytest.raises(CheckpointError, match="tokenizer.ggml.scores"):
        opened.require("tokenizer.ggml.scores")  # a BPE file has no scores


def test_unsupported_architecture_and_tensor_type_are_named(tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    writer = GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    finish(writer, tmp_path / "gpt2.gguf")
    with pytest.raises(CheckpointError, match=r"architecture 'gpt2' is not supported \(supported: llama, qwen2\)"):
        load_model(tmp_path / "gpt2.gguf")

    source = build_tiny_causal_lm(tmp_path / "hf", "llama", seed=10)
    file = write_text_gguf(tmp_path / "q50.gguf", source.config, source.state_dict(), "Q8_0")
    # rewrite one matrix as Q5_0, a type the gguf package reads but we do not take
    from gguf import GGUFReader

    reader = GGUFReader(str(file))
    writer = GGUFWriter(str(tmp_path / "q5.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith(("llama.", "tokenizer.")):
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        if tensor.name == "blk.1.ffn_up.weight":
            values = quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape)))
            writer.add_tensor(tensor.name, quants.quantize(values, GGMLQuantizationType.Q5_0),
                              raw_dtype=GGMLQuantizationType.Q5_0)
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    finish(writer, tmp_path / "q5.gguf")
    with pytest.raises(CheckpointError, match=r"q5\.gguf: tensor types not supported: blk\.1\.ffn_up\.weight "
                                              r"\(Q5_0\) \(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K"):
        load_model(tmp_path / "q5.gguf")


def test_model_paths_are_checked(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model folder not found"):
        locate(tmp_path / "nope")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="expected one text GGUF and at most one mmproj"):
        locate(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="a checkpoint folder or a .gguf file"):
        locate(tmp_path / "weights.bin")
    with pytest.raises(CheckpointError, match="mmproj file not found"):
        locate(tmp_path / "a.gguf", tmp_path / "mmproj.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(CheckpointError, match=r"bad\.gguf: not a readable GGUF file"):
        load_model(tmp_path / "bad.gguf")


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1", "F16"])
def test_copy_into_dequantizes_whole_rows_a_piece_at_a_time_as_tensor_does(kind: str, tmp_path: Path,
                                                                           monkeypatch) -> None:
    from ros_infmllm.model import gguf_file

    source = build_tiny_causal_lm(tmp_path / "hf", "llama", seed=6)
    file = gguf_file.open_gguf(write_text_gguf(tmp_path / f"{kind}.gguf", source.config, source.state_dict(), kind))
    name = "token_embd.weight"
    rows, columns = file.tensor_shape(name)
    monkeypatch.setattr(gguf_file, "PIECE_ELEMENTS", 3 * columns)  # pieces of 3 rows, the last one short
    assert rows % 3
    target = torch.full((rows, columns), float("nan"), dtype=torch.bfloat16)
    file.copy_into(name, target)
    assert torch.equal(target, file.tensor(name).to(torch.bfloat16))
