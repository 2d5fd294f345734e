"""The client libraries agents are built with, unchanged, against a live server on a tiny model with Qwen2.5's
real tokenizer tokens and chat template: the openai client's Responses API, the OpenAI Agents SDK (Responses
and chat completions), pydantic-ai, instructor and langchain-openai. Each test checks the library's own
result object."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import openai
import pydantic
import pytest
from test_server_helpers import ServerThread
from tiny_models import make_family_tokenizer, make_tiny_hf_model

from shoal.server.app import ServerConfig

NO_CALL = None  # logit_bias that keeps the model from opening a call, filled in by the fixture


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=10)
    celsius: int = pydantic.Field(ge=-50, le=50)


def get_weather(city: Annotated[str, pydantic.Field(max_length=10)]) -> str:
    """The weather in a city."""
    return f"sunny in {city[:10]}"


WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    tokenizer = make_family_tokenizer("qwen2.5")
    path = make_tiny_hf_model("qwen2", root / "tiny-qwen", tokenizer=tokenizer, context=4096)
    global NO_CALL
    NO_CALL = {str(tokenizer.convert_tokens_to_ids("<tool_call>")): -100}
    with ServerThread(path, ServerConfig(data_dir=tmp_path_factory.mktemp("data")), max_num_seqs=8) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


# ---------------------------------------------------------------- the openai client's Responses API


def test_models_retrieve(client):
    name = client.models.list().data[0].id
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_responses_create_text_and_stored_chain(client):
    first = client.responses.create(
        model="tiny-qwen", input="Say hi.", instructions="Be brief.", max_output_tokens=8, temperature=0
    )
    assert first.status in ("completed", "incomplete") and first.output[0].type == "message"
    assert isinstance(first.output_text, str) and first.usage.output_tokens >= 1
    assert client.responses.retrieve(first.id).id == first.id
    second = client.responses.create(
        model="tiny-qwen", input="And again.", previous_response_id=first.id, max_output_tokens=4
    )
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens  # the first turn came along
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(first.id)
    assert info.value.body["message"].startswith("no stored response")


def test_responses_function_calls_whole_and_streamed(client):
    done = client.responses.create(
        model="tiny-qwen", input="Weather in Oslo?", tools=[WEATHER_TOOL], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=200,
    )  # fmt: skip
    (call,) = [item for item in done.output if item.type == "function_call"]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}
    kinds = []
    with client.responses.stream(
        model="tiny-qwen", input="Weather in Oslo?", tools=[WEATHER_TOOL], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=200,
    ) as stream:  # fmt: skip
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.done" in kinds
    (streamed,) = [item for item in final.output if item.type == "function_call"]
    assert set(json.loads(streamed.arguments)) == {"city"}


def test_responses_stream_text_and_parse(client):
    with client.responses.stream(model="tiny-qwen", input="Tell me a story.", max_output_tokens=12) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1]  # cut at max_output_tokens: incomplete, as OpenAI ends such a stream
    cut = final.response.status == "incomplete"
    assert final.type == ("response.incomplete" if cut else "response.completed")
    assert (final.response.incomplete_details.reason if cut else None) in ("max_output_tokens", None)
    assert deltas and "".join(deltas) == final.response.output_text
    parsed = client.responses.parse(
        model="tiny-qwen", input="Weather in Oslo, as JSON.", text_format=Weather, max_output_tokens=60
    )
    assert isinstance(parsed.output_parsed, Weather)


# ---------------------------------------------------------------- OpenAI Agents SDK


def test_agents_sdk_with_a_required_tool_on_both_apis(server):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)

    async def run_both() -> list:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        results = []
        for model in (
            OpenAIResponsesModel("tiny-qwen", client),
            OpenAIChatCompletionsModel("tiny-qwen", client),
        ):
            agent = Agent(
                name="weather",
                instructions="Use the tool.",
                tools=[function_tool(get_weather)],
                model=model,
                model_settings=ModelSettings(
                    tool_choice="required", max_tokens=200, parallel_tool_calls=False, temperature=0
                ),
                tool_use_behavior="stop_on_first_tool",
            )
            results.append(await Runner.run(agent, "Weather in Oslo?"))
        return results

    for result in asyncio.run(run_both()):
        assert isinstance(result.final_output, str) and result.final_output.startswith("sunny in")


def test_agents_sdk_agent_with_tools_and_an_output_type(server):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    agent = Agent(
        name="weather",
        tools=[function_tool(get_weather)],
        output_type=Weather,
        model=OpenAIChatCompletionsModel("tiny-qwen", client),
        model_settings=ModelSettings(max_tokens=200, temperature=0, extra_body={"logit_bias": NO_CALL}),
    )
    result = asyncio.run(Runner.run(agent, "Weather in Oslo?", max_turns=3))
    assert isinstance(result.final_output, Weather)


# ---------------------------------------------------------------- pydantic-ai


def test_pydantic_ai_agent_with_a_tool_and_an_output_type(server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("tiny-qwen", provider=OpenAIProvider(base_url=server.url + "/v1", api_key="x"))
    agent = Agent(
        model, output_type=Weather, tools=[get_weather], model_settings={"max_tokens": 200, "temperature": 0}
    )
    result = agent.run_sync("Weather in Oslo?")
    assert isinstance(result.output, Weather)


# ---------------------------------------------------------------- instructor


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA", "RESPONSES_TOOLS"])
def test_instructor_modes(client, mode):
    import instructor

    patched = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    if mode == "RESPONSES_TOOLS":
        weather = patched.responses.create(
            model="tiny-qwen",
            input=messages,
            response_model=Weather,
            max_output_tokens=200,
            max_retries=0,
            temperature=0,
        )
    else:
        weather = patched.chat.completions.create(
            model="tiny-qwen",
            messages=messages,
            response_model=Weather,
            max_tokens=200,
            max_retries=0,
            temperature=0,
        )
    assert isinstance(weather, Weather)


# ---------------------------------------------------------------- langchain-openai


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="tiny-qwen",
        base_url=server.url + "/v1",
        api_key="x",
        max_tokens=200,
        max_retries=0,
        temperature=0,
    )
    message = llm.bind_tools([get_weather], tool_choice="any").invoke("Weather in Oslo?")
    (call,) = message.tool_calls[:1]
    assert call["name"] == "get_weather" and set(call["args"]) == {"city"}
    for method in ("function_calling", "json_schema"):
        assert isinstance(llm.with_structured_output(Weather, method=method).invoke("Oslo?"), Weather)
    # json_mode asks for any JSON object, which a random model never closes: '}' is favoured to end it
    (close,) = make_family_tokenizer("qwen2.5").encode("}", add_special_tokens=False)
    closing = llm.model_copy(update={"logit_bias": {close: 30}})
    schema = {"title": "Weather", "type": "object", "properties": {"city": {"type": "string"}}}
    as_json = closing.with_structured_output(schema, method="json_mode").invoke("Weather in Oslo, in JSON.")
    assert isinstance(as_json, dict)


def test_stored_responses_survive_a_restart(tiny_dirs, tmp_path):
    data = tmp_path / "data"
    with ServerThread(tiny_dirs["llama"], ServerConfig(data_dir=data)) as first:
        client = openai.OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0)
        kept = client.responses.create(model="llama", input="Hello", max_output_tokens=4, temperature=0)
        dropped = client.responses.create(model="llama", input="Hi", max_output_tokens=4, store=False)
    with ServerThread(tiny_dirs["llama"], ServerConfig(data_dir=data)) as second:
        client = openai.OpenAI(base_url=second.url + "/v1", api_key="x", max_retries=0)
        again = client.responses.retrieve(kept.id)
        assert again.output_text == kept.output_text and again.usage.total_tokens == kept.usage.total_tokens
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(dropped.id)
        later = client.responses.create(
            model="llama", input="More", previous_response_id=kept.id, max_output_tokens=2
        )
        assert later.usage.input_tokens > kept.usage.input_tokens
