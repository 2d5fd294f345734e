"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers reading the same file."""

from pathlib import Path

import pytest
import torch
from conftest import needs_smollm2

from shoal import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the ocean.",
    "Explain photosynthesis in simple terms.",
    "List three fruits that are red.",
    "How do I boil an egg?",
    "What is 15 plus 27?",
    "Describe a cat in one sentence.",
    "Why is exercise good for health?",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    from shoal.models.loader import default_model_path

    path = Path(default_model_path())
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@needs_smollm2
@pytest.mark.slow
def test_greedy_output_equals_transformers_on_the_same_gguf(smollm2, reference):
    llm = LLM(smollm2, kv_cache_memory=256 << 20)
    prompts = [smollm2.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    outputs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS), use_tqdm=False
    )
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )  # EOS masked, as min_tokens does
        assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist(), prompt
    assert "Paris" in outputs[0].outputs[0].text


@needs_smollm2
@pytest.mark.slow
def test_prefill_logits_match_transformers(smollm2, reference):
    llm = LLM(smollm2, kv_cache_memory=64 << 20)
    prompt = smollm2.tokenizer.encode("The history of the Roman Empire begins with")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([prompt])).logits[0, -1].float(), -1)
    top = out.outputs[0].logprobs[0]
    for token_id, lp in top.items():
        assert lp.logprob == pytest.approx(ref[token_id].item(), abs=1e-3)


@needs_smollm2
@pytest.mark.slow
def test_int8_precision_on_the_default_model_stays_near_float32(smollm2):
    """What precision="int8" costs on the default model (README): over a prompt's positions, the logits move
    by under 4% of their range and the top token stays the same at 90% of positions or more."""
    from test_model_logits import shoal_logits

    import shoal

    int8 = shoal.load_model(precision="int8")
    ids = smollm2.tokenizer.encode(
        "The history of the Roman Empire begins with the founding of Rome in 753 BC, when the twins"
    )
    exact, approx = shoal_logits(smollm2, ids, [len(ids)]), shoal_logits(int8, ids, [len(ids)])
    assert 0 < (exact - approx).abs().max() < 0.04 * (exact.max() - exact.min())
    assert (exact.argmax(-1) == approx.argmax(-1)).float().mean() >= 0.9
