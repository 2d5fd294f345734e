"""Incremental detokenization: multi-byte UTF-8 split across tokens, stop strings spanning tokens."""

import pytest

from shoal.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return tiny_llama.tokenizer


def feed(tokenizer, text: str, **kwargs) -> tuple[IncrementalDetokenizer, list[int], str | None]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    stop = None
    for i in range(1, len(ids) + 1):
        stop = detok.add(ids[:i])
        if stop:
            break
    return detok, ids, stop


@pytest.mark.parametrize(
    "text", ["Café naïve résumé", "日本語のテキスト", "emoji 🎉 and ©", "plain ascii words"]
)
def test_incremental_text_equals_a_full_decode(tokenizer, text):
    detok, ids, _ = feed(tokenizer, text)
    detok.flush(ids)
    assert detok.text == tokenizer.decode(ids) == text


def test_a_character_split_across_tokens_is_never_emitted_half_done(tokenizer):
    text = "🎉日本"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 3  # byte-level BPE: these characters span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    seen = []
    for i in range(1, len(ids) + 1):
        detok.add(ids[:i])
        seen.append(detok.text)
    assert all("\ufffd" not in s for s in seen)
    assert seen[-1] == text


def test_a_stop_string_spanning_tokens_is_found_and_cut(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok, _, stop = feed(tokenizer, text, stop=["fox jumps"])
    assert stop == "fox jumps"
    assert detok.text == "The quick brown "
    assert len(tokenizer.encode("fox jumps", add_special_tokens=False)) > 1 and len(ids) > 5
    kept, _, _ = feed(tokenizer, text, stop=["fox jumps"], include_stop=True)
    assert kept.text == "The quick brown fox jumps"


def test_streamed_text_holds_back_what_could_become_a_stop_string(tokenizer):
    text = "The quick brown fox jumps"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["brown fox"])
    streamed = ""
    for i in range(1, len(ids) + 1):
        if detok.add(ids[:i]):
            break
        stable = detok.stable_text(finished=False)
        assert stable.startswith(streamed)
        streamed = stable
    assert streamed + detok.stable_text(finished=True)[len(streamed) :] == "The quick "
    assert "brown" not in streamed
