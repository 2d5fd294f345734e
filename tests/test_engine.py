"""The engine end to end on a tiny model (float32 and quantized weights): batch invariance, prefix caching, n samples, tight memory, errors."""

import random

import pytest
from conftest import SMALL_KV
from tiny_models import write_gguf

import shoal
from shoal import LLM, InvalidRequestError, SamplingParams


def mixed_prompts(count=32, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(rng.randrange(3, 90))] for _ in range(count)]


def tokens(outputs) -> list[list[int]]:
    return [c.token_ids for o in outputs for c in o.outputs]


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
SEEDED = SamplingParams(
    temperature=0.9, top_p=0.95, top_k=40, min_p=0.02, seed=1234, max_tokens=20, ignore_eos=True
)


@pytest.fixture(
    scope="module",
    params=["float32", "Q4_1", "Q8_0", "Q4_1 int8", "qwen3_moe Q8_0", "mixtral Q4_0 int8", "qwen2_moe Q4_0"],
)
def tiny_llama(request, tiny_dirs, moe_dirs, tmp_path_factory) -> shoal.LoadedModel:
    """Every test here runs on float32 weights, on weights kept quantized (a GGUF of the same model), on
    those against int8 activations (precision="int8"), and on mixtures of experts (where a row's experts
    run over whichever other rows chose them too)."""
    if request.param == "float32":
        return shoal.load_model(tiny_dirs["llama"])
    words = request.param.split()
    hf_dir = moe_dirs[words.pop(0)] if words[0] in moe_dirs else tiny_dirs["llama"]
    qtype, precision = words[0], words[1] if len(words) > 1 else "float32"
    path = tmp_path_factory.mktemp("quantized") / f"model-{qtype}.gguf"
    return shoal.load_model(write_gguf(hf_dir, path, qtype), precision=precision)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, kv_cache_memory=SMALL_KV, max_num_batched_tokens=256)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_each_request_alone_equals_inside_the_full_batch(tiny_llama, llm, params):
    prompts = mixed_prompts()
    batched = tokens(llm.generate(prompts, params, use_tqdm=False))
    alone_llm = LLM(tiny_llama, kv_cache_memory=SMALL_KV, max_num_batched_tokens=64)  # other chunking too
    alone = [tokens(alone_llm.generate([p], params, use_tqdm=False))[0] for p in prompts]
    assert batched == alone
    assert len({tuple(t) for t in batched}) > 16  # the prompts really lead to different outputs


def test_prefix_caching_on_and_off_give_the_same_output(tiny_llama):
    shared = (mixed_prompts(1, seed=5)[0] * 2)[:80]
    prompts = [shared + p for p in mixed_prompts(12, seed=6)]
    on = LLM(tiny_llama, kv_cache_memory=SMALL_KV, enable_prefix_caching=True)
    off = LLM(tiny_llama, kv_cache_memory=SMALL_KV, enable_prefix_caching=False)
    on.generate(prompts[:1], GREEDY, use_tqdm=False)  # computes and caches the shared prefix
    out_on = on.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in out_on[1:]] == [
        len(shared)
    ] * 11  # 5 full blocks, all from the cache
    assert tokens(out_on) == tokens(off.generate(prompts, GREEDY, use_tqdm=False))


def test_requests_sent_together_compute_their_shared_prefix_once(tiny_llama):
    shared = (mixed_prompts(1, seed=5)[0] * 2)[:80]  # 5 full blocks of 16
    prompts = [shared + p[:10] for p in mixed_prompts(6, seed=7)]
    on = LLM(tiny_llama, kv_cache_memory=SMALL_KV, max_num_batched_tokens=1024)
    for i, prompt in enumerate(prompts):
        on.engine.add_request(prompt, GREEDY, f"r{i}")
    on.engine.step()  # one forward pass admits all six: the first fills the shared blocks, the rest share them
    suffixes = sum(len(p) - len(shared) for p in prompts)
    assert on.engine.prompt_tokens_total == len(shared) + suffixes
    outputs = {}
    while on.engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in on.engine.step() if o.finished})
    out_on = [outputs[f"r{i}"] for i in range(len(prompts))]
    assert [o.num_cached_tokens for o in out_on] == [0] + [len(shared)] * 5
    off = LLM(tiny_llama, kv_cache_memory=SMALL_KV, enable_prefix_caching=False)
    assert tokens(out_on) == tokens(off.generate(prompts, GREEDY, use_tqdm=False))


def test_n_samples_share_the_prompt_blocks(tiny_llama):
    llm = LLM(tiny_llama, kv_cache_memory=SMALL_KV)
    engine = llm.engine
    prompt = mixed_prompts(1, seed=9)[0][:40]  # 2 full blocks of 16 + a partial block of 8
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True)
    engine.add_request(prompt, params, "r")
    engine.step()  # prefill + fork: the 4 samples hold the same 3 blocks
    samples = engine.requests["r"].samples
    assert len(samples) == 4
    tables = [s.seq.block_table for s in samples]
    assert all(t == tables[0] for t in tables) and len(tables[0]) == 3
    assert engine.block_manager.num_blocks - engine.block_manager.num_free_blocks == 3
    engine.step()  # each sample writes its first token: the shared partial block is copied 3 times
    tables = [s.seq.block_table for s in engine.requests["r"].samples]
    assert all(t[:2] == tables[0][:2] for t in tables)
    assert len({t[2] for t in tables}) == 4
    assert engine.block_manager.num_blocks - engine.block_manager.num_free_blocks == 2 + 4
    while engine.has_unfinished_requests():
        outs = engine.step()
    out = outs[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different samples
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    first = LLM(tiny_llama, kv_cache_memory=SMALL_KV).generate([prompt], params, use_tqdm=False)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in out.outputs]  # reproducible by seed


def test_a_pool_too_small_for_everyone_still_completes_everything_identically(tiny_llama, llm):
    prompts = mixed_prompts(16, seed=2)
    ample = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    cfg = tiny_llama.config
    block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * 16 * cfg.head_dim * 4
    tight = LLM(tiny_llama, kv_cache_memory=12 * block_bytes, max_num_batched_tokens=128)  # 192 tokens
    assert tokens(tight.generate(prompts, GREEDY, use_tqdm=False)) == ample
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.block_manager.num_free_blocks == 12


def test_results_come_back_in_input_order_with_per_prompt_params(llm):
    prompts = mixed_prompts(6, seed=4)
    params = [SamplingParams(temperature=0, max_tokens=k + 1, ignore_eos=True) for k in range(6)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 3, 4, 5, 6]
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_stop_strings_are_cut_and_stop_tokens_end_generation(llm):
    prompt = "The quick brown fox"
    full = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False
    )[0]
    text = full.outputs[0].text
    stop = text[8:11]
    assert len(stop) == 3 and stop not in text[:8]
    cut = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    third = full.outputs[0].token_ids[2]
    by_token = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[third]),
        use_tqdm=False,
    )[0].outputs[0]
    assert by_token.token_ids == full.outputs[0].token_ids[:3] and by_token.stop_reason == third


def test_logprobs_hold_the_sampled_token_and_the_top_n(llm):
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False)[
        0
    ].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks == [1, 2, 3]
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs, strict=True))
    )


def test_seed_makes_sampling_reproducible_and_different_seeds_differ(llm):
    prompt = mixed_prompts(1, seed=11)[0]

    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True)
        return tokens(llm.generate([prompt], params, use_tqdm=False))[0]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_a_prompt_longer_than_the_context_is_refused_clearly(tiny_llama):
    llm = LLM(tiny_llama, kv_cache_memory=SMALL_KV, max_model_len=64)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.generate([[5] * 100], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="lower max_tokens"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10), use_tqdm=False)
    assert not llm.engine.requests  # nothing was queued


def test_a_request_bigger_than_the_whole_pool_is_refused_at_admission(tiny_llama):
    cfg = tiny_llama.config
    block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * 16 * cfg.head_dim * 4
    llm = LLM(tiny_llama, kv_cache_memory=2 * block_bytes)
    with pytest.raises(InvalidRequestError, match="raise kv_cache_memory"):
        llm.generate([[5] * 30], SamplingParams(max_tokens=10), use_tqdm=False)


def test_bad_token_ids_and_empty_prompts_are_refused(llm):
    with pytest.raises(InvalidRequestError, match="token ids must be in"):
        llm.generate([[1, 2, 10**6]], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([""], GREEDY, use_tqdm=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.5}, r"temperature must be 0 \(greedy\) or between 0.01 and 100"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"n": 0}, "n must be at least 1"),
        ({"top_k": -3}, "top_k must be >= 0"),
        ({"min_p": 2}, "min_p"),
    ],
)
def test_bad_sampling_values_give_clear_errors(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_chat_applies_the_template_to_one_or_many_conversations(llm):
    conv = [{"role": "user", "content": "Hello there"}]
    one = llm.chat(conv, GREEDY, use_tqdm=False)
    many = llm.chat([conv, [{"role": "user", "content": "Other"}]], GREEDY, use_tqdm=False)
    assert len(one) == 1 and len(many) == 2
    assert one[0].outputs[0].token_ids == many[0].outputs[0].token_ids
    assert one[0].prompt.startswith("<|im_start|>user\nHello there")


def test_an_error_inside_one_request_reaches_that_request_only(llm):
    engine = llm.engine
    engine.add_request([5, 6, 7], SamplingParams(temperature=0.5, max_tokens=6, ignore_eos=True), "bad")
    engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), "good")
    engine.requests["bad"].params.temperature = float("nan")  # NaN probabilities: sampling raises
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["bad"].error and finished["bad"].outputs[0].finish_reason == "abort"
    assert finished["good"].error is None and len(finished["good"].outputs[0].token_ids) == 6
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
