"""A ``PromptTemplate`` derived from a checkpoint's Jinja chat template.

The template is rendered (in a sandbox, as transformers renders it) for a few short
conversations with marker texts, and the pieces between the markers are the system block, a
user turn, the assistant's opening and the end of a turn. So any chat format (ChatML, LLaMA-3,
...) becomes the four strings a streaming session writes, and a frame is a user turn whose text
is the image placeholder. A template that will not render those conversations gives None.
"""
from __future__ import annotations

import functools

from ..model.checkpoint_text import ChatTemplateSource
from .templates import IMAGE_PLACEHOLDER, PromptTemplate

_SYSTEM, _USER, _ANSWER = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ANSWER\x01"


def _renderer(chat: ChatTemplateSource):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(chat.source)

    def render(messages: list[tuple[str, str]], generation: bool = False, parts: bool = False) -> str:
        return template.render(messages=[{"role": r, "content": [{"type": "text", "text": c}] if parts else c}
                                         for r, c in messages],
                               add_generation_prompt=generation, bos_token=chat.bos_token,
                               eos_token=chat.eos_token)
    return render


def template_from_chat(chat: ChatTemplateSource, name: str = "chat") -> PromptTemplate | None:
    """The session template for ``chat``, or None if it cannot be derived. Message contents are
    tried as plain strings, then as lists of text parts (the form SmolVLM's template reads)."""
    for parts in (False, True):
        template = _derive(chat, name, parts)
        if template is not None:
            return template
    return None


def _derive(chat: ChatTemplateSource, name: str, parts: bool) -> PromptTemplate | None:
    try:
        render = functools.partial(_renderer(chat), parts=parts)
        system_only = render([("system", _SYSTEM)])
        with_user = render([("system", _SYSTEM), ("user", _USER)])
        opened = render([("system", _SYSTEM), ("user", _USER)], generation=True)
        answered = render([("system", _SYSTEM), ("user", _USER), ("assistant", _ANSWER)])
        user_only = render([("user", _USER)])
    except Exception:  # jinja2 errors, raise_exception, undefined names: no usable template
        return None
    if not (with_user.startswith(system_only) and opened.startswith(with_user) and answered.startswith(with_user)
            and system_only.count(_SYSTEM) == 1 and _ANSWER in answered):
        return None
    user_turn = with_user[len(system_only):]
    assistant_open = opened[len(with_user):]
    reply = answered[len(with_user):]
    if user_turn.count(_USER) != 1 or not reply.startswith(assistant_open):
        return None
    turn_end = reply[len(assistant_open):].split(_ANSWER, 1)[1]
    system = system_only.replace(_SYSTEM, "{system}")
    # A template that writes its own system block when none is given says what its default is.
    default_system = ""
    before, after = system_only.split(_SYSTEM)
    implicit = user_only[:len(user_only) - len(user_turn)] if user_only.endswith(user_turn) else ""
    if implicit.startswith(before) and implicit.endswith(after) and len(implicit) > len(before) + len(after):
        default_system = implicit[len(before):len(implicit) - len(after)]
    stop = tuple(dict.fromkeys(s for s in (turn_end.strip(), chat.eos_token) if s))
    return PromptTemplate(name=name, system=system, frame=user_turn.replace(_USER, IMAGE_PLACEHOLDER),
                          query=user_turn.replace(_USER, "{query}") + assistant_open, turn_end=turn_end,
                          stop=stop, default_system=default_system)
