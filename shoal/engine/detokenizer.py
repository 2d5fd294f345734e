"""Incremental detokenization: right for multi-byte UTF-8 and for stop strings that span tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INCOMPLETE = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    """Decodes a growing list of output tokens into text, a few tokens at a time.

    Text is decoded from a window that starts a few tokens back (prefix_offset) so tokenizers that merge
    spaces or bytes across tokens decode the same as a full decode; a window ending in an incomplete UTF-8
    character waits for the next token.
    """

    tokenizer: Any
    skip_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    include_stop: bool = False
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, output_ids: list[int]) -> str | None:
        """Decode up to the newest token. Returns the stop string if one now appears in the text."""
        prefix = self._decode(output_ids[self.prefix_offset : self.read_offset])
        full = self._decode(output_ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(INCOMPLETE):
            searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(output_ids)
            return self._cut_stop(searched_from)
        return None

    def _cut_stop(self, start: int) -> str | None:
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self.text = self.text[: index + len(stop)] if self.include_stop else self.text[:index]
        return stop

    def flush(self, output_ids: list[int]) -> None:
        """At the end, emit whatever is left (an incomplete character becomes U+FFFD, as a full decode does)."""
        if self.read_offset < len(output_ids):
            prefix = self._decode(output_ids[self.prefix_offset : self.read_offset])
            full = self._decode(output_ids[self.prefix_offset :])
            self.text += full[len(prefix) :]
            self.read_offset = len(output_ids)

    def finish(self, output_ids: list[int], whole: bool, cut_at_stop: bool) -> None:
        """The final text: decoded in one go (whole: nothing was decoded step by step), else what is left
        flushed, unless a stop string cut it on purpose. Idempotent."""
        if whole:
            self.text, self.read_offset = self._decode(output_ids), len(output_ids)
        elif not cut_at_stop:
            self.flush(output_ids)

    def stable_text(self, finished: bool) -> str:
        """Text safe to stream: holds back a tail that could still turn into a stop string."""
        if finished or not self.stop:
            return self.text
        hold = max(len(s) for s in self.stop) - 1
        return self.text[: max(0, len(self.text) - hold)]
