"""The real Gemma 3 270M (Q4_K_M GGUF, a pretrained model) against transformers reading the same file; in a
busy batch; and a chat answer through the server with the Gemma turn format shoal supplies (the file has no
chat template)."""

import openai
import pytest
import torch
from conftest import needs_gemma3
from test_server_helpers import ServerThread

import shoal
from shoal import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf) -> shoal.LoadedModel:
    return shoal.load_model(gemma3_gguf)


@needs_gemma3
@pytest.mark.slow
def test_greedy_output_equals_transformers_on_the_same_gguf(gemma3, gemma3_gguf):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(gemma3_gguf)
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    assert gemma3.config.layer_windows.count(0) == 3 and gemma3.config.eos_token_ids == (1, 106)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outputs = LLM(gemma3, kv_cache_memory=128 << 20).generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = torch.tensor([out.prompt_token_ids])
        assert out.prompt_token_ids[0] == 2  # <bos>, as Gemma's tokenizer adds it
        with torch.no_grad():
            ref = reference.eval().generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )  # fmt: skip
        assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist(), prompt
    assert "France" in outputs[0].outputs[0].text


@needs_gemma3
@pytest.mark.slow
def test_a_prompt_alone_and_inside_a_busy_batch_gives_the_same_tokens(gemma3):
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=16, ignore_eos=True)
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]  # 12 prompts
    llm = LLM(gemma3, kv_cache_memory=128 << 20)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


@needs_gemma3
@pytest.mark.slow
def test_a_chat_answer_through_the_server_uses_gemmas_turns(gemma3, gemma3_gguf):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a color."},
    ]
    text = gemma3.apply_chat_template(messages)
    assert text == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nName a color.<end_of_turn>\n<start_of_turn>model\n"
    )
    with ServerThread(gemma3_gguf, kv_cache_memory=64 << 20) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        chat = client.chat.completions.create(
            model="gemma-3-270m-q4_k_m.gguf", messages=messages, max_tokens=12, temperature=0
        )
    assert chat.usage.prompt_tokens == len(gemma3.render_chat(messages))
    answer = chat.choices[0].message.content
    assert isinstance(answer, str) and answer.strip()
    assert "<end_of_turn>" not in answer and "<start_of_turn>" not in answer
    expected = LLM(gemma3).chat([messages], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert answer == expected[0].outputs[0].text  # the server answers as the library does
