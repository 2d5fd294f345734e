"""A model's chat template: messages rendered to text, and to token ids in the one way every front end uses
(the server, LLM.chat, sessions, Ray Data), so the prompt has exactly the special tokens the model expects.

transformers renders the template in a sandboxed Jinja environment.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from shoal.errors import InvalidRequestError, ModelLoadError
from shoal.sampling_params import check_text

Message = dict[str, Any]


@dataclass(eq=False)
class ChatTemplate:
    tokenizer: Any
    model_name: str

    @property
    def source(self) -> str:
        return getattr(self.tokenizer, "chat_template", None) or ""

    @functools.cached_property
    def knows_developer(self) -> bool:
        """Whether the template renders the developer role itself (OpenAI's newer name for system)."""
        return "developer" in self.source

    @functools.cached_property
    def special_prefix(self) -> list[int]:
        """The ids the tokenizer puts before any text it encodes (a BOS, or nothing)."""
        plain = self.tokenizer.encode("a", add_special_tokens=False)
        marked = self.tokenizer.encode("a", add_special_tokens=True)
        if len(marked) > len(plain) and marked[len(marked) - len(plain) :] == plain:
            return marked[: len(marked) - len(plain)]
        return []

    def render(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The conversation as text, as the template writes it (its own BOS included, when it writes one)."""
        if not self.source:
            raise ModelLoadError(
                f"model {self.model_name!r} has no chat template; use generate() with plain prompts"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                self.normalize(messages),
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **(template_kwargs or {}),
            )
        except ModelLoadError:
            raise
        except Exception as e:  # the template's raise_exception(), or a message it cannot render
            raise InvalidRequestError(f"the model's chat template cannot render these messages: {e}") from e
        return check_text(text, "a message")

    def render_ids(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The conversation as token ids: the rendered text tokenized as text, with the tokenizer's BOS put in
        front only when the template has not written it already."""
        return self.encode_rendered(self.render(messages, add_generation_prompt, tools, template_kwargs))

    def encode_rendered(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        prefix = self.special_prefix
        if prefix and ids[: len(prefix)] != prefix:
            ids = prefix + ids
        return ids

    def normalize(self, messages: list[Message]) -> list[Message]:
        """Messages as the template can take them: for a template that does not know the developer role,
        developer messages become system ones, and the leading system and developer messages merge into one
        (developer text first)."""
        if self.knows_developer or not any(m.get("role") == "developer" for m in messages):
            return messages
        lead = 0
        while lead < len(messages) and messages[lead].get("role") in ("system", "developer"):
            lead += 1
        head = sorted(messages[:lead], key=lambda m: m["role"] != "developer")  # stable: developer first
        rest = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages[lead:]]
        if not head:
            return rest
        merged = "\n\n".join(_text(m.get("content")) for m in head if _text(m.get("content")))
        return [{"role": "system", "content": merged}, *rest]


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return content or ""
