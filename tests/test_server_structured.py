"""The OpenAI surface agents and evaluators use, through the official `openai` client against a real server:
structured outputs (parse(), json_object, json_schema), tool calls (forced, named, auto; streamed and not;
results sent back), logit_bias, echo with logprobs against transformers, /tokenize, and the Batch API."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pydantic
import pytest
import torch
from conftest import needs_smollm2
from test_server_helpers import (
    ServerThread,
    batch_lines,
    make_model,
    read_jsonl,
    run_batch_with_client,
)

from shoal.server.app import ServerConfig

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
JSON_QUESTIONS = [
    "Give a JSON object with the keys name and age for a person.",
    "Reply in JSON: what is 2+2?",
    "List three colours as a JSON object.",
    "Describe a cat in JSON.",
    "Return the capital of France as JSON.",
    "Give me a JSON object for a book with title and author.",
]


class Box(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    count: int = pydantic.Field(ge=0, le=99)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), context=4096)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("data"))
    with ServerThread(model, config, max_num_seqs=16) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def check_weather(arguments: str) -> None:
    value = json.loads(arguments)
    assert set(value) == {"city", "unit"} and isinstance(value["city"], str) and len(value["city"]) <= 12
    assert value["unit"] in ("c", "f")


def check_time(arguments: str) -> None:
    value = json.loads(arguments)
    assert set(value) == {"zone"} and isinstance(value["zone"], int) and -12 <= value["zone"] <= 12


def test_parse_returns_objects_for_8_concurrent_requests(server):
    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        calls = [
            client.chat.completions.parse(
                model="tiny-llama",
                messages=[{"role": "user", "content": f"Describe box {i}."}],
                response_format=Box,
                max_tokens=80,
                temperature=1.0,
                seed=i,
            )
            for i in range(8)
        ]
        return await asyncio.gather(*calls)

    completions = asyncio.run(run())
    boxes = [c.choices[0].message.parsed for c in completions]
    assert len(boxes) == 8 and all(isinstance(b, Box) for b in boxes)


@needs_smollm2
def test_json_object_output_always_parses():
    # A random tiny model would write one endless string; the real model ends its objects.
    with ServerThread(None, ServerConfig(), kv_cache_memory=64 << 20) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for question in JSON_QUESTIONS:
            _ask_for_json(client, question, seed=1)


def _ask_for_json(client: openai.OpenAI, question: str, seed: int) -> None:
    chat = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": question}],
        response_format={"type": "json_object"},
        max_tokens=300,
        temperature=0.5,
        seed=seed,
    )
    choice = chat.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(json.loads(choice.message.content), dict)


def test_json_schema_and_vllm_structured_outputs(client):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=ASK,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
        max_tokens=20,
    )
    assert json.loads(chat.choices[0].message.content) in ({"ok": True}, {"ok": False})
    done = client.completions.create(
        model="tiny-llama",
        prompt="Colour:",
        max_tokens=8,
        extra_body={"structured_outputs": {"choice": ["red", "blue"]}},
    )
    assert done.choices[0].text in ("red", "blue")
    legacy = client.completions.create(
        model="tiny-llama", prompt="Code:", max_tokens=8, extra_body={"guided_regex": "[0-9]{3}"}
    )
    assert len(legacy.choices[0].text) == 3 and legacy.choices[0].text.isdigit()


def test_bad_schemas_and_conflicts_are_400(client):
    cases = [
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "frobnicate"}},
            }
        },
        {"response_format": {"type": "json_schema"}},
        {"extra_body": {"structured_outputs": {"regex": "a(b"}}},
        {"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}},
        {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
        {"tools": [WEATHER], "extra_body": {"structured_outputs": {"regex": "a+"}}},
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
    ]
    for extra in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=4, **extra)
        assert info.value.status_code == 400


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choices_give_schema_valid_arguments(client, stream):
    for choice, check, name in [
        ("required", None, None),
        ({"type": "function", "function": {"name": "get_time"}}, check_time, "get_time"),
        ({"type": "function", "function": {"name": "get_weather"}}, check_weather, "get_weather"),
    ]:
        for seed in range(3):
            kwargs = dict(
                model="tiny-llama", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=120,
                temperature=1.0, seed=seed, parallel_tool_calls=False,
            )  # fmt: skip
            if stream:
                with client.chat.completions.stream(**kwargs) as events:
                    for _ in events:
                        pass
                    chat = events.get_final_completion()
            else:
                chat = client.chat.completions.create(**kwargs)
            choice_ = chat.choices[0]
            assert choice_.finish_reason == "tool_calls", choice_
            (call,) = choice_.message.tool_calls
            assert call.id and call.type == "function"
            assert call.function.name == name if name else call.function.name in ("get_weather", "get_time")
            (check or {"get_weather": check_weather, "get_time": check_time}[call.function.name])(
                call.function.arguments
            )


def test_a_tool_result_sent_back_is_answered(client):
    first = client.chat.completions.create(
        model="tiny-llama", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120, seed=0,
        parallel_tool_calls=False,
    )  # fmt: skip
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(
        model="tiny-llama", messages=messages, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}
WRITTEN = {
    "hermes": f"Let me check.<tool_call>\n{json.dumps(CALL)}\n</tool_call>",
    "llama3": json.dumps({"name": "get_weather", "parameters": CALL["arguments"]}),
    "mistral": f"[TOOL_CALLS] [{json.dumps(CALL)}]",
}


@pytest.mark.parametrize("fmt_name", sorted(WRITTEN))
def test_each_format_in_text_is_parsed_whole_and_streamed(fmt_name):
    """Markers written as text (a tokenizer without them as tokens): parsed from the decoded ids."""
    from tiny_models import make_tiny_tokenizer

    from shoal.server.tools import FORMATS, ToolCallStream, ToolParser, ToolSyntax

    hf = make_tiny_tokenizer()
    parser = ToolParser(ToolSyntax(FORMATS[fmt_name], renders_tools=False), hf)
    text = WRITTEN[fmt_name]
    ids = hf.encode(text, add_special_tokens=False)
    content, calls = parser.parse(ids)
    assert content == ("Let me check." if fmt_name == "hermes" else None)
    (call,) = calls
    assert call.function.name == "get_weather"
    check_weather(call.function.arguments)
    stream, sent, got = ToolCallStream(parser), [], []
    for i, token in enumerate(ids):
        piece = hf.decode(ids[: i + 1]).removeprefix(hf.decode(ids[:i]))
        new_content, new = stream.add(piece, [token], finished=i == len(ids) - 1)
        sent.append(new_content)
        got += new
    assert "".join(sent) == (content or "") and [c.function.arguments for _, c in got] == [
        call.function.arguments
    ]
    plain = hf.encode("Just text, no call.", add_special_tokens=False)
    assert parser.parse(plain) == ("Just text, no call.", [])


@pytest.mark.parametrize("fmt_name", ["hermes", "llama3", "mistral"])
def test_auto_constrains_only_once_a_call_has_started(fmt_name):
    import llguidance
    import llguidance.hf
    from tiny_models import make_tiny_tokenizer

    from shoal.server.protocol import Tool
    from shoal.server.tools import FORMATS, ToolPlan, ToolSyntax

    hf = make_tiny_tokenizer()
    tokenizer = llguidance.hf.from_tokenizer(hf)
    syntax = ToolSyntax(FORMATS[fmt_name], renders_tools=False)

    def accepts(choice: str, text: str) -> bool:
        plan = ToolPlan([Tool.model_validate(WEATHER)], choice, True, syntax)
        matcher = llguidance.LLMatcher(tokenizer, plan.grammar(), log_level=0)
        ids = hf.encode(text, add_special_tokens=False)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    good = WRITTEN[fmt_name].replace("Let me check.", "")
    bad = good.replace("get_weather", "get_nothing")
    assert accepts("auto", good) and accepts("required", good)
    assert accepts("auto", "Hello there, no call needed.") and not accepts("required", "Hello there")
    assert not accepts("auto", bad) and not accepts("required", bad)
    if not FORMATS[fmt_name].bare:  # text, then a call that goes wrong: refused once the call has begun
        assert accepts("auto", "Sure. " + good) and not accepts("auto", "Sure. " + bad)


def test_auto_tool_choice_answers_with_text_or_calls(client):
    chat = client.chat.completions.create(model="tiny-llama", messages=ASK, tools=[WEATHER], max_tokens=16)
    assert chat.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_logit_bias_plus_100_forces_and_minus_100_removes(server, client):
    def first_tokens(count: int, **extra) -> list[str]:
        done = client.completions.create(
            model="tiny-llama", prompt="The quick brown", max_tokens=count, temperature=0, logprobs=0, **extra
        )
        return done.choices[0].logprobs.tokens

    forty_two = httpx.post(server.url + "/detokenize", json={"tokens": [42]}).json()["prompt"]
    assert first_tokens(3, logit_bias={"42": 100}) == [forty_two] * 3
    (greedy,) = first_tokens(1)
    ids = httpx.post(server.url + "/tokenize", json={"prompt": greedy, "add_special_tokens": False}).json()
    assert ids["count"] == 1
    assert first_tokens(1, logit_bias={str(ids["tokens"][0]): -100}) != [greedy]


def test_echo_with_logprobs_matches_transformers(client, model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "The quick brown fox jumps over the lazy dog."
    done = client.completions.create(
        model="tiny-llama", prompt=text, max_tokens=1, echo=True, logprobs=2, temperature=0
    )
    choice = done.choices[0]
    assert choice.text.startswith(text)
    ids = AutoTokenizer.from_pretrained(model)(text)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([ids])).logits[0].double(), dim=-1)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    for position in range(1, len(ids)):
        assert abs(logprobs.token_logprobs[position] - float(expected[position - 1, ids[position]])) < 1e-3
    vllm = client.completions.create(
        model="tiny-llama", prompt=text, max_tokens=1, extra_body={"prompt_logprobs": 1}
    )
    entries = (
        vllm.model_extra["choices"][0]["prompt_logprobs"]
        if vllm.model_extra
        else vllm.choices[0].prompt_logprobs
    )
    assert entries[0] is None and len(entries) == len(ids)
    assert abs(entries[1][str(ids[1])]["logprob"] - float(expected[0, ids[1]])) < 1e-3


def test_echo_with_logprobs_streams(client):
    chunks = list(
        client.completions.create(
            model="tiny-llama", prompt="Hello world", max_tokens=3, echo=True, logprobs=1, stream=True
        )
    )
    first = chunks[0].choices[0]
    assert first.text.startswith("Hello world") and first.logprobs.token_logprobs[0] is None
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices) >= 5


def test_tokenize_and_detokenize(server):
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] > 0
    back = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert "Hello world" in back["prompt"]
    chat = httpx.post(server.url + "/tokenize", json={"messages": ASK}).json()
    assert chat["count"] > tokens["count"]
    for bad in ({}, {"prompt": "a", "messages": ASK}, {"tokens": [-1]}, {"prompt": "\ud800"}):
        route = "/detokenize" if "tokens" in bad else "/tokenize"
        body = json.dumps(bad)  # ensure_ascii: the lone surrogate goes as the escape \ud800
        assert httpx.post(server.url + route, content=body).status_code == 400


def test_the_batch_api_takes_structured_outputs_and_tools(client):
    lines = batch_lines(2, url="/v1/chat/completions")
    lines[0]["body"].update(response_format={"type": "json_object"}, max_tokens=200, ignore_eos=False)
    lines[1]["body"].update(tools=[WEATHER], tool_choice="required", max_tokens=120, ignore_eos=False)
    done = run_batch_with_client(client, lines, "/v1/chat/completions")
    records = {
        r["custom_id"]: r["response"]["body"]
        for r in read_jsonl(client.files.content(done.output_file_id).text)
    }
    assert isinstance(json.loads(records["req-0"]["choices"][0]["message"]["content"]), dict)
    check_weather(records["req-1"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
