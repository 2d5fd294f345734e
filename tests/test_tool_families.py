"""Tool calls on the models people run: tiny random models whose tokenizers carry the real families' special
tokens (Qwen2.5's <tool_call> as an added token, Llama 3.1's <|python_tag|> and <|eom_id|>, Mistral v0.3's
[TOOL_CALLS]) and whose chat templates are the families' own, served and driven with the openai client.
Also: one BOS in a rendered prompt, the developer role, strict schemas, tools with response_format."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import openai
import pytest
from test_server_helpers import ServerThread
from tiny_models import FAMILIES, make_family_tokenizer, make_tiny_hf_model

import shoal
from shoal.server.protocol import NamedFunction, NamedToolChoice, Tool
from shoal.server.tools import ToolParser, ToolPlan, ToolSyntax

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        # no additionalProperties: strict by default must forbid other keys all the same
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
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
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MARKERS = {"qwen2.5": "<tool_call>", "llama3.1": "<|python_tag|>", "mistral-v0.3": "[TOOL_CALLS]"}
FORMAT = {"qwen2.5": "hermes", "llama3.1": "llama3", "mistral-v0.3": "mistral"}
TOOL_FAMILIES = sorted(FORMAT)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {
        name: make_tiny_hf_model(f.arch, root / name, tokenizer=make_family_tokenizer(name), context=4096)
        for name, f in FAMILIES.items()
        if name in FORMAT
    }


@pytest.fixture(scope="module", params=TOOL_FAMILIES)
def family(request, family_dirs):
    """(family name, server, openai client, tokenizer) for each family."""
    name = request.param
    with ServerThread(family_dirs[name], max_num_seqs=8) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        yield name, server, client, make_family_tokenizer(name)


def check_weather(arguments: str) -> None:
    value = json.loads(arguments)
    assert set(value) == {"city", "unit"}, value  # no property outside the schema
    assert isinstance(value["city"], str) and len(value["city"]) <= 10 and value["unit"] in ("c", "f")


def check_time(arguments: str) -> None:
    value = json.loads(arguments)
    assert set(value) == {"zone"} and isinstance(value["zone"], int) and -12 <= value["zone"] <= 12


CHECKS = {"get_weather": check_weather, "get_time": check_time}


def run(client: openai.OpenAI, stream: bool, **kwargs):
    kwargs = {"model": client.models.list().data[0].id, "messages": ASK, "max_tokens": 160, **kwargs}
    if not stream:
        return client.chat.completions.create(**kwargs), []
    chunks = []
    with client.chat.completions.stream(**kwargs) as events:
        for event in events:
            if event.type == "chunk":
                chunks.append(event.chunk)
        return events.get_final_completion(), chunks


def test_each_family_is_recognised_with_its_marker_tokens(family_dirs):
    for name in TOOL_FAMILIES:
        tokenizer = make_family_tokenizer(name)
        syntax = ToolSyntax.for_tokenizer(tokenizer)
        assert syntax.format.name == FORMAT[name] and syntax.renders_tools
        assert syntax.begin_id == tokenizer.convert_tokens_to_ids(MARKERS[name])
    llama = ToolSyntax.for_tokenizer(make_family_tokenizer("llama3.1"))
    assert llama.stop_ids == (make_family_tokenizer("llama3.1").convert_tokens_to_ids("<|eom_id|>"),)


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_calls_are_schema_valid(family, stream):
    name, _, client, _ = family
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, parallel in (("required", False), (named, True)):
        for seed in range(2):
            chat, chunks = run(
                client, stream, tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=parallel,
                temperature=1.0, seed=seed,
            )  # fmt: skip
            done = chat.choices[0]
            assert done.finish_reason == "tool_calls", (name, done)
            (call,) = done.message.tool_calls  # one call: parallel false, or a named choice
            if choice is named:
                assert call.function.name == "get_time"
            CHECKS[call.function.name](call.function.arguments)
            if name == "mistral-v0.3":
                assert len(call.id) == 9 and call.id.isalnum()  # what Mistral's template accepts back
            for chunk in chunks[1:]:  # no empty deltas while a call is held back
                delta = chunk.choices[0].delta if chunk.choices else None
                assert chunk.usage or delta.content or delta.tool_calls or chunk.choices[0].finish_reason


def test_auto_mode_starts_a_call_from_the_marker_token(family):
    name, _, client, tokenizer = family
    marker = tokenizer.convert_tokens_to_ids(MARKERS[name])
    chat, _ = run(
        client,
        False,
        tools=[WEATHER],
        logit_bias={str(marker): 100},
        temperature=0,
        parallel_tool_calls=False,
    )
    done = chat.choices[0]
    assert done.finish_reason == "tool_calls", done
    check_weather(done.message.tool_calls[0].function.arguments)
    plain, _ = run(client, False, tools=[WEATHER], logit_bias={str(marker): -100}, max_tokens=8)
    assert not plain.choices[0].message.tool_calls


def test_a_call_and_its_result_go_back_through_the_template(family):
    name, _, client, _ = family
    first, _ = run(client, False, tools=[WEATHER], tool_choice="required", seed=3)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=messages, tools=[WEATHER],
        tool_choice="none", max_tokens=4,
    )  # fmt: skip
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_tools_with_response_format_answer_in_the_schema(family):
    name, _, client, tokenizer = family
    marker = tokenizer.convert_tokens_to_ids(MARKERS[name])
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    answer, _ = run(
        client, False, tools=[WEATHER], response_format=response_format, logit_bias={str(marker): -100}
    )
    value = json.loads(answer.choices[0].message.content)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9
    called, _ = run(
        client, False, tools=[WEATHER], response_format=response_format, logit_bias={str(marker): 100},
        parallel_tool_calls=False,
    )  # fmt: skip
    assert called.choices[0].finish_reason == "tool_calls"
    check_weather(called.choices[0].message.tool_calls[0].function.arguments)


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_a_named_choice_grammar_allows_exactly_one_call_and_no_extra_keys(name):
    tokenizer = make_family_tokenizer(name)
    syntax = ToolSyntax.for_tokenizer(tokenizer)
    llg = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
    choice = NamedToolChoice(function=NamedFunction(name="get_weather"))
    plan = ToolPlan([Tool.model_validate(WEATHER)], choice, True, syntax)
    fmt = syntax.format
    args = {"city": "Oslo", "unit": "c"}
    one = json.dumps({"name": "get_weather", fmt.arguments_key: args})
    extra = json.dumps({"name": "get_weather", fmt.arguments_key: {**args, "type": "string"}})

    def written(*calls: str) -> list[int]:
        marker = [syntax.begin_id]
        if fmt.array:
            return marker + tokenizer.encode(" [" + fmt.separator.join(calls) + "]", add_special_tokens=False)
        if fmt.bare:
            return marker + tokenizer.encode(fmt.separator.join(calls), add_special_tokens=False)
        ids: list[int] = []
        for i, call in enumerate(calls):
            sep = tokenizer.encode(fmt.separator, add_special_tokens=False) if i else []
            ids += sep + marker + tokenizer.encode(f"\n{call}\n", add_special_tokens=False) + [syntax.end_id]
        return ids

    def accepts(ids: list[int]) -> bool:
        matcher = llguidance.LLMatcher(llg, plan.grammar(), log_level=0)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    assert accepts(written(one))
    assert not accepts(written(extra))
    assert not accepts(written(one, one))
    content, calls = ToolParser(syntax, tokenizer).parse(written(one))
    assert content is None and [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == args


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_a_rendered_chat_has_exactly_one_bos(family_dirs, name):
    model = shoal.load_model(family_dirs[name])
    ids = model.render_chat(ASK)
    bos = model.tokenizer.bos_token_id
    if FAMILIES[name].bos is None:
        assert bos is None or bos not in ids
    else:
        assert ids[0] == bos and ids[1] != bos
    text = model.apply_chat_template(ASK)  # a rendered text given to generate() gets no second BOS either
    llm = shoal.LLM(model, kv_cache_memory=8 << 20)
    (out,) = llm.generate([text], shoal.SamplingParams(max_tokens=1), use_tqdm=False)
    assert out.prompt_token_ids == ids


def test_developer_messages_become_system_for_templates_that_do_not_know_them(family_dirs, tiny_dirs):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
    ]
    qwen = shoal.load_model(family_dirs["qwen2.5"])
    rendered = qwen.apply_chat_template(messages)
    assert rendered.startswith("<|im_start|>system\nAnswer in French.\n\nBe brief.<|im_end|>")
    assert "developer" not in rendered
    chatml = shoal.load_model(tiny_dirs["llama"])  # renders any role as written: developer would be a turn
    assert "<|im_start|>developer" not in chatml.apply_chat_template(messages)
    assert chatml.apply_chat_template(messages[1:]).startswith("<|im_start|>system\nAnswer in French.")
    mistral = shoal.load_model(family_dirs["mistral-v0.3"])  # its template refuses unknown roles
    assert "Answer in French." in mistral.apply_chat_template(messages[1:])


def test_a_template_that_knows_developer_keeps_it(tiny_dirs):
    model = shoal.load_model(tiny_dirs["llama"])
    template = model.tokenizer.chat_template
    model.tokenizer.chat_template = "{# knows the developer role #}" + template
    try:
        rendered = model.apply_chat_template([{"role": "developer", "content": "x"}])
        assert rendered.startswith("<|im_start|>developer\nx")
    finally:
        model.tokenizer.chat_template = template


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_a_gguf_of_each_family_makes_forced_calls_with_one_bos(family_dirs, tmp_path, name):
    """As the families ship in GGUF: the markers are tokens of the file (USER_DEFINED for Qwen2.5's
    <tool_call>, CONTROL for the others), the chat template is in its metadata."""
    from tiny_models import write_gguf

    path = write_gguf(family_dirs[name], tmp_path / f"{name}.gguf", "Q8_0")
    model = shoal.load_model(path)
    syntax = ToolSyntax.for_tokenizer(model.tokenizer)
    assert syntax.format.name == FORMAT[name] and syntax.begin_id is not None
    ids = model.render_chat(ASK)
    bos = model.tokenizer.bos_token_id
    assert sum(t == bos for t in ids) == (1 if FAMILIES[name].bos else 0)
    with ServerThread(path, max_num_seqs=4) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for stream in (False, True):
            chat, _ = run(client, stream, tools=[WEATHER], tool_choice="required", seed=1, temperature=1.0)
            assert chat.choices[0].finish_reason == "tool_calls"
            check_weather(chat.choices[0].message.tool_calls[0].function.arguments)
