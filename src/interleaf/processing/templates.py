"""The chat templates of the InternVL family (InternVL's ``conversation.py``, style "MPT").

A conversation renders as ``system_prompt + sep + sum(role + message + sep) + open_role``, where
``system_prompt = system_template.format(system_message=...)``. The four templates used by
Mini-InternVL 1B/2B/4B and InternVL2.5 differ only in their role markers, separator and default
system message:

| name             | roles                                      | sep              |
|------------------|--------------------------------------------|------------------|
| `Hermes-2`       | `<|im_start|>user\\n`, `<|im_start|>assistant\\n` | `<|im_end|>`     |
| `internlm2-chat` | same                                       | `<|im_end|>`     |
| `phi3-chat`      | `<|user|>\\n`, `<|assistant|>\\n`            | `<|end|>`        |
| `internvl2_5`    | as Hermes-2                                | `<|im_end|>\\n`  |

Generation stops at ``stop_str`` (= ``sep.strip()``). A checkpoint's ``system_message`` overrides the
template's default. ``ChatTemplate.parts`` splits a rendered conversation into labelled pieces so that
training can mask the loss per template without re-implementing the rendering.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from interleaf.errors import ConfigError, InputError

# Default system messages (Chinese, as shipped upstream: the models were trained with them).
SYSTEM_INTERNVL2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYSTEM_INTERNVL2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

Role = Literal["system", "user", "assistant"]
PartKind = Literal["header", "content", "sep"]


@dataclass(frozen=True)
class TemplatePart:
    """One piece of a rendered conversation.

    ``role`` is whose turn it belongs to; ``kind`` is ``"header"`` (the role marker, or for the system
    turn the whole filled-in system prompt), ``"content"`` (the message text) or ``"sep"``.
    ``turn`` is the index of the message in the list given to ``parts`` (-1 for the system turn).
    """

    role: Role
    kind: PartKind
    text: str
    turn: int


@dataclass(frozen=True)
class ChatTemplate:
    """An InternVL conversation template (MPT style)."""

    name: str
    system_template: str  # contains "{system_message}"
    system_message: str
    roles: tuple[str, str]  # (user marker, assistant marker)
    sep: str

    @property
    def stop_str(self) -> str:
        """The text that ends an assistant turn (the generation stop token)."""
        return self.sep.strip()

    def system_prompt(self, system_message: str | None = None) -> str:
        msg = self.system_message if system_message is None else system_message
        return self.system_template.format(system_message=msg)

    def parts(
        self,
        messages: Sequence[tuple[str, str | None]] | Sequence[dict],
        system_message: str | None = None,
        add_generation_prompt: bool = False,
    ) -> list[TemplatePart]:
        """Render a conversation as labelled parts; ``"".join(p.text for p in parts)`` is the prompt.

        Args:
            messages: ``(role, text)`` pairs or ``{"role", "content"}`` dicts with role ``"user"``
                / ``"assistant"`` (aliases ``human``/``gpt``); a leading ``"system"`` message overrides
                the system message. A final assistant message with text ``None`` is an open turn.
            system_message: overrides the template's default system message.
            add_generation_prompt: append the open assistant header after the last message.
        """
        msgs = _normalise(messages)
        if msgs and msgs[0][0] == "system":
            system_message = msgs[0][1] or ""
            msgs = msgs[1:]
        out = [
            TemplatePart("system", "header", self.system_prompt(system_message), -1),
            TemplatePart("system", "sep", self.sep, -1),
        ]
        for turn, (role, text) in enumerate(msgs):
            if role == "system":
                raise InputError(f"chat message {turn}: a system message may only come first")
            marker = self.roles[0] if role == "user" else self.roles[1]
            out.append(TemplatePart(role, "header", marker, turn))
            if text is None:  # open turn (generation prompt); must be last
                if turn != len(msgs) - 1:
                    raise InputError(f"chat message {turn}: only the last message may be empty")
                return out
            out.append(TemplatePart(role, "content", text, turn))
            out.append(TemplatePart(role, "sep", self.sep, turn))
        if add_generation_prompt:
            out.append(TemplatePart("assistant", "header", self.roles[1], len(msgs)))
        return out

    def render(
        self,
        messages: Sequence[tuple[str, str | None]] | Sequence[dict],
        system_message: str | None = None,
        add_generation_prompt: bool = False,
    ) -> str:
        """The full prompt text of a conversation (see ``parts``)."""
        return "".join(p.text for p in self.parts(messages, system_message, add_generation_prompt))

    def chat_prompt(
        self,
        question: str,
        history: Iterable[tuple[str, str]] | None = None,
        system_message: str | None = None,
    ) -> str:
        """Prompt for one new question after ``history`` [(question, answer), ...], assistant turn open."""
        msgs: list[tuple[str, str | None]] = []
        for q, a in history or ():
            msgs += [("user", q), ("assistant", a)]
        msgs.append(("user", question))
        return self.render(msgs, system_message, add_generation_prompt=True)


_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}


def _normalise(messages) -> list[tuple[str, str | None]]:
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            role, text = m.get("role", m.get("from")), m.get("content", m.get("value"))
        else:
            role, text = m
        if role not in _ROLE_ALIASES:
            raise InputError(f"chat message {i}: unknown role {role!r} (want user/assistant/system)")
        out.append((_ROLE_ALIASES[role], text))
    return out


_IM_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
_IM_SYSTEM = "<|im_start|>system\n{system_message}"

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate("Hermes-2", _IM_SYSTEM, SYSTEM_INTERNVL2, _IM_ROLES, "<|im_end|>"),
        ChatTemplate("internlm2-chat", _IM_SYSTEM, SYSTEM_INTERNVL2, _IM_ROLES, "<|im_end|>"),
        ChatTemplate(
            "phi3-chat",
            "<|system|>\n{system_message}",
            SYSTEM_INTERNVL2,
            ("<|user|>\n", "<|assistant|>\n"),
            "<|end|>",
        ),
        ChatTemplate("internvl2_5", _IM_SYSTEM, SYSTEM_INTERNVL2_5, _IM_ROLES, "<|im_end|>\n"),
    )
}


def get_template(name: str, system_message: str | None = None) -> ChatTemplate:
    """The template called ``name``; ``system_message`` (e.g. a checkpoint's) replaces its default."""
    if name not in TEMPLATES:
        raise ConfigError(f"template: unknown chat template {name!r} (known: {', '.join(TEMPLATES)})")
    t = TEMPLATES[name]
    if system_message is not None:
        t = ChatTemplate(t.name, t.system_template, system_message, t.roles, t.sep)
    return t
