"""Structured outputs with the official `openai` client: OpenAI's
`response_format` (json_object, json_schema) and vLLM's guided_* extensions,
checked by what a client does with the answer: parse it, validate it."""
import json

import jsonschema
import openai
import pytest

from conftest import MODEL

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 30},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}

PROMPTS = [
    "Describe a fictional baker as JSON.",
    "Invent a person who lives by the sea.",
    "Give me a JSON profile of a retired pilot.",
    "Make up a student and describe them.",
    "Who is your favourite detective? Answer as JSON.",
    "Create a character for a fantasy novel.",
    "Describe a gardener in Paris.",
    "A chess champion from Norway: describe them.",
    "Tell me about an astronaut.",
    "Describe your neighbour.",
]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def person_format(strict=True):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


def chat(server, content, **kw):
    return client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_json_schema_answers_validate_at_temperature_1(server, prompt):
    r = chat(server, prompt, temperature=1.0, max_tokens=200, response_format=person_format())
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_streamed_json_schema_and_parallel_samples_validate(server):
    chunks = list(chat(server, PROMPTS[0], temperature=1.0, max_tokens=200, seed=3,
                       response_format=person_format(), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    r = chat(server, PROMPTS[1], temperature=1.0, max_tokens=200, n=3, seed=5,
             response_format=person_format(strict=False))
    assert len(r.choices) == 3
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_object_gives_a_parseable_object(server):
    r = chat(server, "List two fruits and their colours as JSON.", temperature=0.7, seed=1,
             max_tokens=120, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_guided_choice_regex_and_grammar(server):
    choices = ["positive", "negative", "neutral"]
    for seed in range(3):
        r = chat(server, "Sentiment of: 'I loved this film!'", temperature=1.0, seed=seed,
                 extra_body={"guided_choice": choices})
        assert r.choices[0].message.content in choices
    c = client(server)
    r = c.completions.create(model=MODEL, prompt="A phone number: ", max_tokens=20, temperature=1.0,
                             seed=2, extra_body={"guided_regex": r"\d{3}-\d{4}"})
    text = r.choices[0].text
    assert len(text) == 8 and text[3] == "-" and (text[:3] + text[4:]).isdigit(), text
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]+/'
    r = c.completions.create(model=MODEL, prompt="What is 2 + 2?", max_tokens=20, temperature=0,
                             extra_body={"guided_grammar": grammar})
    assert r.choices[0].text.startswith("The answer is ") and r.choices[0].text.endswith(".")
    # vLLM's guided_json takes the schema as an object or as text.
    r = chat(server, PROMPTS[2], temperature=0, max_tokens=200, extra_body={"guided_json": json.dumps(PERSON)})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


@pytest.mark.parametrize("extra, param, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "nonsense"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex", ""),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "undefined_rule"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"guided_json": "{not json"}, "guided_json", "JSON"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", "give one"),
])
def test_a_constraint_that_does_not_compile_is_a_400_naming_it(server, extra, param, says):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, "hi", max_tokens=5, extra_body=extra)
    assert e.value.body["param"] == param, e.value.body
    assert says in e.value.body["message"], e.value.body


WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 40},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                      "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 40}},
                                                     "required": ["tz"]}}},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def tool_chat(server, **kw):
    return client(server).chat.completions.create(model=MODEL, messages=kw.pop("messages", ASK), tools=TOOLS, **kw)


def test_a_forced_tool_call_validates_streamed_and_not(server):
    for seed in range(3):
        r = tool_chat(server, tool_choice=NAMED, temperature=1.0, seed=seed, max_tokens=100)
        (call,) = r.choices[0].message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
        assert r.choices[0].message.content is None and r.choices[0].finish_reason == "stop"
    chunks = list(tool_chat(server, tool_choice=NAMED, temperature=0, max_tokens=100, stream=True))
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 for d in deltas) and len(deltas) > 2, "arguments stream as they are generated"
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), WEATHER)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_required_gives_calls_to_known_tools(server):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    r = tool_chat(server, tool_choice="required", temperature=0, max_tokens=200, parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert r.choices[0].finish_reason == "tool_calls"
    chunks = list(tool_chat(server, tool_choice="required", temperature=0, max_tokens=200, stream=True))
    calls = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert calls and [c.index for c in calls] == list(range(len(calls)))
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_answers_in_text_and_a_tool_result_is_taken_back(server):
    r = tool_chat(server, messages=[{"role": "user", "content": "What is the capital of France?"}],
                  temperature=0, max_tokens=40)
    m = r.choices[0].message
    assert m.tool_calls is None and "Paris" in m.content and r.choices[0].finish_reason == "stop"
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo", "unit": "celsius"})}}
    back = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp_c": 3, "sky": "snow"})}]
    r = tool_chat(server, messages=back, temperature=0, max_tokens=60)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kw, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"logprobs": True}, "logprobs"),
])
def test_tool_requests_that_cannot_be_served_are_refused(server, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        tool_chat(server, max_tokens=5, **kw)
    assert e.value.body["param"] == param, e.value.body


@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_langchain_structured_output_returns_a_validated_object(server, method):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=30)
        age: int

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL, temperature=0,
                     max_tokens=200, max_retries=0)
    out = llm.with_structured_output(Person, method=method).invoke(
        "Describe a fictional baker named Anna, age 34, as JSON with name and age.")
    assert isinstance(out, Person) and out.name and out.age >= 0


def test_langchain_bind_tools_returns_tool_calls(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL, temperature=0,
                     max_tokens=100, max_retries=0)
    for choice in ["get_weather", "any"]:
        msg = llm.bind_tools([get_weather], tool_choice=choice).invoke("What is the weather in Oslo?")
        assert msg.tool_calls and all(c["name"] == "get_weather" and isinstance(c["args"]["city"], str)
                                      for c in msg.tool_calls), msg
