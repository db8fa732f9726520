"""Session templates derived from checkpoints' Jinja chat templates."""
from __future__ import annotations

from ros_infmllm.model.checkpoint_text import ChatTemplateSource
from ros_infmllm.session.chat_template import template_from_chat
from ros_infmllm.session.templates import PRESETS, template_for

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_chatml_template_with_an_implicit_system_prompt() -> None:
    template = template_from_chat(ChatTemplateSource(SMOLLM2, "<|im_start|>", "<|im_end|>"))
    assert template.system == "<|im_start|>system\n{system}<|im_end|>\n"
    assert template.frame == "<|im_start|>user\n<image><|im_end|>\n"
    assert template.query == "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
    assert template.turn_end == "<|im_end|>\n" and template.stop == ("<|im_end|>",)
    assert template.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_llama3_template_pieces() -> None:
    template = template_from_chat(ChatTemplateSource(LLAMA3, "<|begin_of_text|>", "<|end_of_text|>"))
    assert template.system == "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
    assert template.query == ("<|start_header_id|>user<|end_header_id|>\n\n{query}<|eot_id|>"
                              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert template.turn_end == "<|eot_id|>" and template.stop == ("<|eot_id|>", "<|end_of_text|>")
    assert template.default_system == ""


def test_templates_that_cannot_render_give_none_and_auto_falls_back() -> None:
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    assert template_from_chat(ChatTemplateSource(refusing)) is None
    assert template_from_chat(ChatTemplateSource("{{ messages[0]['content'] ")) is None  # a syntax error
    assert template_for("auto", None, "qwen2", None) is PRESETS["qwen2"]
    chat = template_from_chat(ChatTemplateSource(SMOLLM2))
    assert template_for("auto", None, "llama", chat) is chat
    assert template_for("vicuna", None, "llama", chat) is PRESETS["vicuna"]
