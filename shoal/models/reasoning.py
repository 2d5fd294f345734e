"""Reasoning models (DeepSeek-R1, Qwen3, QwQ) think in <think>...</think> before they answer. Where the
thinking is, from the token ids: a request whose prompt ends inside an open <think> (R1's templates open it)
starts out thinking; otherwise an answer that begins with <think> thinks until </think>. The thinking is
reported apart from the answer, and a structured output constrains only the answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReasoningTokens:
    start_id: int
    end_id: int

    @classmethod
    def find(cls, tokenizer: Any) -> ReasoningTokens | None:
        """The model's <think> and </think> tokens, when it has both and its chat template uses them."""
        template = getattr(tokenizer, "chat_template", None) or ""
        vocab = tokenizer.get_vocab()
        if "</think>" not in template or "<think>" not in vocab or "</think>" not in vocab:
            return None
        return cls(vocab["<think>"], vocab["</think>"])

    def open_in(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt ends inside a <think> that it opened."""
        for token in reversed(prompt_ids):
            if token == self.end_id:
                return False
            if token == self.start_id:
                return True
        return False


@dataclass
class ReasoningState:
    """Where one sample's thinking is in its output ids: [start, end) are the thinking's own tokens."""

    tokens: ReasoningTokens
    thinking: bool  # still thinking
    start: int = 0
    end: int | None = None  # where the thinking's tokens end (before </think>), once it has
    may_open: bool = False  # the next token may open a <think> (the answer's first token)

    @classmethod
    def for_prompt(cls, tokens: ReasoningTokens, prompt_ids: list[int]) -> ReasoningState:
        inside = tokens.open_in(prompt_ids)
        return cls(tokens, thinking=inside, may_open=not inside)

    def add(self, output_ids: list[int]) -> None:
        """Note the newest output token."""
        token, count = output_ids[-1], len(output_ids)
        if self.may_open and count == 1 and token == self.tokens.start_id:
            self.thinking, self.start = True, 1
        elif self.thinking and token == self.tokens.end_id:
            self.thinking, self.end = False, count - 1
        self.may_open = False

    @property
    def answer_start(self) -> int | None:
        """Where the answer's tokens begin in the output (None while thinking)."""
        if self.thinking:
            return None
        return 0 if self.end is None else self.end + 1

    def num_tokens(self, num_output: int) -> int:
        """Output tokens that belong to the thinking, its markers included."""
        start = self.answer_start
        return num_output if start is None else start
