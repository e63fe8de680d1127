"""The OpenAI-compatible server, live on a local port, with the official ``openai`` client.

Two servers: the embedded demo model (float32, so greedy replies are exact) behind an API key,
and a stand-in engine that replies with a scripted Harmony token sequence, for tool calls and
reasoning, which a model with random weights does not make.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import logging

import httpx
import jax.numpy as jnp
import jsonschema
import numpy as np
import openai
import pytest
import uvicorn

import gptoss_jax
from gptoss_jax.demo import ensure_demo_checkpoint
from gptoss_jax.engine import Delta, Engine, QueueFullError, RequestHandle, SamplingParams
from gptoss_jax.serving.app import create_app
from gptoss_jax.serving.state import ServerState
from gptoss_jax.tokenizer import Tokenizer

API_KEY = "test-key"
CONTEXT = 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, state: ServerState):
        self.state = state
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def demo():
    folder = ensure_demo_checkpoint()
    model = gptoss_jax.load(folder, dtype=jnp.float32)
    tokenizer = Tokenizer.from_pretrained_dir(folder)
    engine = Engine(model, max_batch=16, max_context=CONTEXT, prefill_chunk=128, tokenizer=tokenizer)
    live = LiveServer(ServerState(tokenizer, "demo", API_KEY, engine))
    yield live
    live.stop()
    engine.close()


class ScriptedEngine:
    """Answers every request with the same token ids, as a model would stream them; records prompts."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.prompts: list[list[int]] = []
        self.refuse = False
        self.running = self.waiting = 0

    def submit(self, prompt, params: SamplingParams) -> RequestHandle:
        if self.refuse:
            raise QueueFullError("1 requests are already waiting (max_queue=1)")
        self.prompts.append(list(prompt))
        params = params.checked(len(prompt), CONTEXT, 1 << 20)
        handle = RequestHandle(len(self.prompts), np.asarray(prompt), params)

        def play() -> None:
            for token in self.tokens[:params.max_tokens]:
                if handle.cancel_requested:
                    handle._finish("cancelled")
                    return
                handle._push(Delta([token], None, time.perf_counter()))
                if token in params.stop_token_ids:
                    handle._finish("stop")
                    return
            handle._finish("length")

        threading.Thread(target=play, daemon=True).start()
        return handle


REPLY = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
         'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>')
WEATHER_TOOL = dict(type="function", function=dict(
    name="get_weather", description="Current weather in a city",
    parameters=dict(type="object", properties=dict(city=dict(type="string")), required=["city"])))


@pytest.fixture(scope="module")
def scripted():
    tokenizer = Tokenizer.from_pretrained_dir(ensure_demo_checkpoint())
    engine = ScriptedEngine(tokenizer.encode(REPLY, allowed_special="all"))
    live = LiveServer(ServerState(tokenizer, "scripted", None, engine))
    yield live, engine, tokenizer
    live.stop()


def _chat(client, **options):
    options.setdefault("messages", [dict(role="user", content="Hello there")])
    return client.chat.completions.create(model="demo", temperature=0, **options)


def test_a_streamed_greedy_chat_reply_equals_the_whole_one(demo):
    client = demo.client()
    whole = _chat(client, max_tokens=24)
    chunks = list(_chat(client, max_tokens=24, stream=True, stream_options=dict(include_usage=True)))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    message = whole.choices[0].message
    assert content == (message.content or "") and reasoning == (getattr(message, "reasoning_content", None) or "")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    assert whole.choices[0].finish_reason == "length" and whole.usage.prompt_tokens > 20


def test_responses_streamed_and_whole_agree(demo):
    client = demo.client()
    whole = client.responses.create(model="demo", input="Hi", instructions="Be brief.", max_output_tokens=16,
                                    temperature=0)
    events = list(client.responses.create(model="demo", input="Hi", instructions="Be brief.", max_output_tokens=16,
                                          temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == whole.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert whole.usage.output_tokens == 16
    follow_up = client.responses.create(model="demo", input="And then?", previous_response_id=whole.id,
                                        max_output_tokens=4, temperature=0)
    assert follow_up.usage.input_tokens > whole.usage.input_tokens  # the first exchange is in the prompt


def test_completions_echo_the_prompt_with_its_logprobs(demo):
    client = demo.client()
    prompt = "Once upon a time"
    out = client.completions.create(model="demo", prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=2)
    choice = out.choices[0]
    prompt_tokens = out.usage.prompt_tokens
    assert choice.text.startswith(prompt)
    assert len(choice.logprobs.tokens) == prompt_tokens + 5
    assert choice.logprobs.token_logprobs[0] is None
    assert all(lp < 0 for lp in choice.logprobs.token_logprobs[1:])
    # Greedy: each generated token is the most likely one at its step.
    generated = slice(prompt_tokens, None)
    for token_lp, top in zip(choice.logprobs.token_logprobs[generated], choice.logprobs.top_logprobs[generated]):
        assert token_lp == pytest.approx(max(top.values()), abs=1e-5)
    plain = client.completions.create(model="demo", prompt=prompt, max_tokens=5, temperature=0)
    assert choice.text == prompt + plain.choices[0].text


def test_sixteen_concurrent_streams_each_get_their_solo_reply(demo):
    client = demo.client()
    requests = [dict(messages=[dict(role="user", content=f"Question number {i}")], max_tokens=4 + 3 * i)
                for i in range(16)]
    solo = [_chat(client, **request).choices[0].message.content or "" for request in requests]

    def streamed(request):
        return "".join(c.choices[0].delta.content or "" for c in _chat(client, stream=True, **request) if c.choices)

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(streamed, requests)) == solo


def test_a_resent_prompt_reports_its_cached_tokens_in_every_api(demo):
    client = demo.client()
    system = " ".join(f"Rule {i}: answer plainly." for i in range(40))  # several 128-token blocks
    messages = [dict(role="system", content=system), dict(role="user", content="Hello there")]
    first = _chat(client, messages=messages, max_tokens=6)
    again = _chat(client, messages=messages, max_tokens=6)
    assert again.choices[0].message == first.choices[0].message
    assert again.usage.prompt_tokens == first.usage.prompt_tokens > 256
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= 256 and cached % 128 == 0 and cached >= first.usage.prompt_tokens_details.cached_tokens
    # n choices compute their prompt once: the usage is one prompt's.
    choices = _chat(client, messages=[dict(role="system", content=system + " Be kind."),
                                      dict(role="user", content="Hi")], max_tokens=3, n=3)
    assert len(choices.choices) == 3 and choices.usage.prompt_tokens_details.cached_tokens >= 256
    completion = client.completions.create(model="demo", prompt=[system + " One", system + " Two"], max_tokens=2)
    assert completion.usage.prompt_tokens_details.cached_tokens >= 2 * 128
    inputs = dict(model="demo", input="Hello there", instructions=system, max_output_tokens=2, temperature=0)
    client.responses.create(**inputs)
    assert client.responses.create(**inputs).usage.input_tokens_details.cached_tokens >= 256
    metrics = httpx.get(f"{demo.url}/metrics").text
    hits = float(next(line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("gptoss_prefix_cache_hit_tokens_total")))
    assert hits >= cached and 'gptoss_prefix_cache_blocks{state="used"}' in metrics


def test_a_client_that_disconnects_frees_its_slot(demo):
    engine = demo.state.engine
    body = dict(model="demo", messages=[dict(role="user", content="Tell me a long story")], max_tokens=900,
                temperature=0, stream=True)
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{demo.url}/v1/chat/completions", json=body,
                         headers=dict(authorization=f"Bearer {API_KEY}")) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: sent before the engine admits the request
            deadline = time.monotonic() + 30
            while engine.running != 1:
                assert time.monotonic() < deadline, "the request never took a slot"
                time.sleep(0.01)
    deadline = time.monotonic() + 30
    while engine.running:
        assert time.monotonic() < deadline, "the disconnected request still holds its slot"
        time.sleep(0.05)


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "JSON"),
    (dict(model="demo"), 400, "messages"),
    (dict(model="demo", messages="hi"), 400, "messages"),
    (dict(model="demo", messages=[dict(role="wizard", content="hi")]), 400, "role"),
    (dict(model="demo", messages=[dict(role="user", content="hi")], temperature=3), 400, "temperature"),
    (dict(model="demo", messages=[dict(role="user", content="hi")], max_tokens=CONTEXT), 400,
     f"plus max_tokens ({CONTEXT}) exceeds the engine's context of {CONTEXT}"),
    (dict(model="demo", messages=[dict(role="user", content="hi")], stop=["a", "b", "c", "d", "e"]), 400,
     "at most 4 stop strings"),
    (dict(model="other", messages=[dict(role="user", content="hi")]), 404, "does not exist"),
])
def test_bad_input_gets_openai_shaped_errors(demo, body, status, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{demo.url}/v1/chat/completions", content=content, timeout=60,
                          headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]


def test_the_api_key_is_required_and_the_server_still_answers(demo):
    with pytest.raises(openai.AuthenticationError):
        _chat(demo.client(api_key="wrong"), max_tokens=2)
    assert _chat(demo.client(), max_tokens=2).usage.completion_tokens == 2
    assert [m.id for m in demo.client().models.list()] == ["demo"]
    assert httpx.get(f"{demo.url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{demo.url}/metrics").text
    assert "gptoss_generated_tokens_total" in metrics and "gptoss_time_to_first_token_seconds_bucket" in metrics


def test_a_tool_call_comes_back_as_tool_calls_with_reasoning(scripted):
    live, _, _ = scripted
    out = live.client().chat.completions.create(model="scripted", messages=[dict(role="user", content="Paris?")],
                                                tools=[WEATHER_TOOL])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "Need the weather."
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_tool_call_arguments_arrive_as_deltas(scripted):
    live, _, _ = scripted
    chunks = list(live.client().chat.completions.create(
        model="scripted", messages=[dict(role="user", content="Paris?")], tools=[WEATHER_TOOL], stream=True))
    calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or ())]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert len(calls) > 2  # the arguments came in pieces
    assert json.loads("".join(call.function.arguments or "" for call in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_result_and_tool_choice_reach_the_prompt(scripted):
    live, engine, tokenizer = scripted
    messages = [
        dict(role="system", content="You answer about weather."),
        dict(role="user", content="Paris?"),
        dict(role="assistant", reasoning_content="Need the weather.", tool_calls=[dict(
            id="call_1", type="function", function=dict(name="get_weather", arguments='{"city": "Paris"}'))]),
        dict(role="tool", tool_call_id="call_1", content='{"temp": 20}'),
    ]
    live.client().chat.completions.create(model="scripted", messages=messages, tools=[WEATHER_TOOL],
                                          tool_choice=dict(type="function", function=dict(name="get_weather")))
    prompt = tokenizer.decode(engine.prompts[-1])
    assert "You answer about weather." in prompt and "type get_weather" in prompt
    assert "<|channel|>analysis<|message|>Need the weather.<|end|>" in prompt  # kept: between call and answer
    assert ('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>'
            in prompt)
    assert prompt.endswith("<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
                           "<|message|>")
    with pytest.raises(openai.BadRequestError, match="answers no earlier assistant tool call"):
        live.client().chat.completions.create(model="scripted", messages=[dict(role="tool", tool_call_id="x",
                                                                               content="1")])


def test_responses_function_calls_and_their_outputs(scripted):
    live, engine, tokenizer = scripted
    client = live.client()
    tool = dict(type="function", name="get_weather", description="Current weather",
                parameters=WEATHER_TOOL["function"]["parameters"])
    first = client.responses.create(model="scripted", input="Paris?", tools=[tool])
    kinds = [item.type for item in first.output]
    assert kinds == ["reasoning", "function_call"]
    call = first.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    client.responses.create(model="scripted", previous_response_id=first.id, tools=[tool], input=[
        dict(type="function_call_output", call_id=call.call_id, output='{"temp": 20}')])
    prompt = tokenizer.decode(engine.prompts[-1])
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>' in prompt


def test_a_full_queue_answers_429_and_loading_503(scripted):
    live, engine, _ = scripted
    engine.refuse = True
    try:
        with pytest.raises(openai.RateLimitError):
            live.client().chat.completions.create(model="scripted", messages=[dict(role="user", content="x")])
    finally:
        engine.refuse = False
    loading = LiveServer(ServerState(None, "demo"))
    try:
        with pytest.raises(openai.InternalServerError, match="loading"):
            loading.client().chat.completions.create(model="demo", messages=[dict(role="user", content="x")])
        assert httpx.get(f"{loading.url}/health").status_code == 503
    finally:
        loading.stop()


ANSWER_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["city", "days", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 9},
                   "unit": {"enum": ["C", "F"]}},
}
JSON_FORMAT = dict(type="json_schema", json_schema=dict(name="forecast", schema=ANSWER_SCHEMA, strict=True))


def test_response_format_holds_for_every_choice_and_streams_as_whole(demo):
    client = demo.client()
    options = dict(model="demo", messages=[dict(role="user", content="Forecast?")], response_format=JSON_FORMAT,
                   max_tokens=300, seed=3, extra_body=dict(thinking_token_budget=4))
    whole = client.chat.completions.create(n=3, **options)
    for choice in whole.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), ANSWER_SCHEMA)
    chunks = list(client.chat.completions.create(stream=True, **options))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("tool_choice", ["required", dict(type="function", function=dict(name="get_weather"))])
def test_strict_tool_arguments_are_valid(demo, tool_choice):
    schemas = dict(get_weather=ANSWER_SCHEMA, get_time={"type": "object", "additionalProperties": False,
                                                       "required": ["tz"], "properties": {"tz": {"enum": ["UTC"]}}})
    tools = [dict(type="function", function=dict(name=name, strict=True, parameters=schema))
             for name, schema in schemas.items()]
    out = demo.client().chat.completions.create(
        model="demo", messages=[dict(role="user", content="Paris?")], tools=tools, tool_choice=tool_choice,
        max_tokens=200, seed=5, n=3)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name in schemas if tool_choice == "required" else call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_responses_text_format_constrains_the_output_text(demo):
    out = demo.client().responses.create(
        model="demo", input="Forecast?", max_output_tokens=300, temperature=1, extra_body=dict(thinking_token_budget=3),
        text=dict(format=dict(type="json_schema", name="forecast", schema=ANSWER_SCHEMA, strict=True)))
    assert out.status == "completed"
    jsonschema.validate(json.loads(out.output_text), ANSWER_SCHEMA)
    assert out.text.format.type == "json_schema"


def _with(schema) -> dict:
    return dict(type="json_schema", json_schema=dict(name="x", schema=schema, strict=True))


@pytest.mark.parametrize("path, extra, fragment", [
    ("chat/completions", dict(response_format=_with({"type": "string", "pattern": "(("})),
     "response_format.json_schema.schema"),
    ("chat/completions", dict(response_format=_with({"type": "object", "colour": "red"})),
     "response_format.json_schema.schema.colour"),
    ("chat/completions", dict(response_format=_with(["not", "an", "object"])), "response_format.json_schema.schema"),
    ("chat/completions", dict(response_format=dict(type="yaml")), "response_format.type"),
    ("chat/completions", dict(tools=[dict(type="function", function=dict(
        name="f", strict=True, parameters={"type": "object", "properties": {"a": {"type": "wizard"}}}))]),
     "tools[0].function.parameters"),
    ("responses", dict(text=dict(format=dict(type="xml"))), "text.format.type"),
])
def test_bad_formats_get_a_400_naming_the_field(demo, path, extra, fragment):
    body = dict(model="demo", max_tokens=4, **extra)
    body.update(dict(input="hi", max_output_tokens=4) if path == "responses" else
                dict(messages=[dict(role="user", content="hi")]))
    body.pop("max_tokens") if path == "responses" else None
    response = httpx.post(f"{demo.url}/v1/{path}", json=body, timeout=60,
                          headers=dict(Authorization=f"Bearer {API_KEY}"))
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


def test_text_outside_harmony_comes_back_as_content_in_every_endpoint(demo, caplog):
    client = demo.client()
    with caplog.at_level(logging.WARNING, logger="gptoss_jax.serving.translate"):
        whole = _chat(client, max_tokens=16)
    assert whole.choices[0].message.content  # the demo model writes no channel: its text is the content
    assert sum("outside Harmony" in record.message for record in caplog.records) == 1
    chunks = list(_chat(client, max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    response = client.responses.create(model="demo", input="Hello there", max_output_tokens=16, temperature=0)
    assert [item.type for item in response.output] == ["message"] and response.output_text


@pytest.mark.parametrize("flags, caching, pool_bytes", [
    ([], True, None), (["--no-prefix-caching"], False, None), (["--prefix-cache-gb", "2.5"], True, 2_500_000_000),
])
def test_serve_flags_reach_the_engine(monkeypatch, flags, caching, pool_bytes):
    from gptoss_jax import cli
    from gptoss_jax.serving import serve

    seen = {}
    monkeypatch.setattr(serve, "serve", lambda load, **options: seen.update(options["engine_options"]))
    assert cli.main(["serve", "--prefill-budget", "4096", *flags]) == 0
    assert (seen["prefix_caching"], seen["prefix_cache_bytes"], seen["prefill_budget"]) == (caching, pool_bytes, 4096)
