"""lm-eval's own OpenAI-completions client, with its remote tokenizer (read from /tokenizer_info, /tokenize and
/detokenize, no hub), scores loglikelihoods against a live server: equal to transformers on the same model."""

from __future__ import annotations

import pytest
import torch
from test_server_helpers import ServerThread

CASES = [
    ("The capital of France is", " Paris"),
    ("One, two, three,", " four"),
    ("The quick brown fox", " jumps over the lazy dog"),
]


@pytest.fixture(scope="module")
def server(tiny_dirs):
    with ServerThread(tiny_dirs["llama"], max_num_seqs=8) as s:
        yield s


def reference_loglikelihood(model_dir: str, context: str, continuation: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(head), len(whole)))


def test_lm_eval_local_completions_with_the_remote_tokenizer(server, tiny_dirs):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        model="llama", base_url=server.url + "/v1/completions", tokenizer_backend="remote",
        num_concurrent=2, max_retries=1,
    )  # fmt: skip
    requests = [
        Instance("loglikelihood", {}, (context, continuation), i)
        for i, (context, continuation) in enumerate(CASES)
    ]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (loglikelihood, _greedy) in zip(CASES, results, strict=True):
        expected = reference_loglikelihood(tiny_dirs["llama"], context, continuation)
        assert abs(loglikelihood - expected) < 1e-3, (context, loglikelihood, expected)
