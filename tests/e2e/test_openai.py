"""The official `openai` client against a real Switchyard serving SmolLM2."""
import asyncio
import http.client
import json
import socket
import subprocess

import httpx
import openai
import pytest

from conftest import MODEL, Server, binary, free_port, metric

QUESTION = "What is the capital of France? Answer in one word."


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def ask(c, content, **kw):
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_greedy_answer_names_paris(server):
    r = ask(client(server), QUESTION, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_concatenates_to_the_non_stream_text(server):
    c = client(server)
    full = ask(c, "Name three colors.", temperature=0, max_tokens=40)
    chunks = list(ask(c, "Name three colors.", temperature=0, max_tokens=40, stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_max_tokens_cut_gives_length(server):
    r = ask(client(server), "Tell me a long story about dragons.", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_bad_parameters_raise_bad_request(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, "hi", temperature=5)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, "hi", max_tokens=100000)
    assert "8192" in str(e.value) and "100000" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[])
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("field, value", [
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    ("function_call", "auto"),
    ("prediction", {"type": "content", "content": "x"}),
    ("modalities", ["text", "audio"]),
    ("skip_special_tokens", False),
])
def test_a_field_not_honoured_is_refused_by_name(server, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(server), "hi", max_tokens=2, extra_body={field: value})
    assert e.value.body["param"] == field and field in e.value.body["message"]
    # Completions refuse the same way, and name completions' own unsupported fields.
    for extra in [{field: value}, {"suffix": "x"}]:
        with pytest.raises(openai.BadRequestError) as e:
            client(server).completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == next(iter(extra))
    # Fields documented as ignored are accepted.
    r = ask(client(server), "hi", max_tokens=2, metadata={"team": "a"}, store=False)
    assert r.choices[0].message.content is not None


def test_models_retrieve_and_unknown_routes_answer_in_the_protocols_shape(server):
    c = client(server)
    m = c.models.retrieve(MODEL)
    assert (m.id, m.object) == (MODEL, "model")
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"
    r = httpx.get(f"{server.url}/v1/no-such-route")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = httpx.get(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(f"{server.url}/v2/no-such-route")
    assert r.status_code == 404 and "Unknown request URL" in r.json()["error"]
    # A token-id prompt is refused naming the prompt, not a parser's type.
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt=[1, 2, 99999999], max_tokens=2)
    assert e.value.body["param"] == "prompt" and "vocabulary" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt=[1, "a"], max_tokens=2)
    assert e.value.body["param"] == "prompt" and "PromptIn" not in e.value.body["message"]


def test_logit_bias_forces_bans_and_is_checked(server):
    c = client(server)
    tokens = lambda r: [t.token for t in r.choices[0].logprobs.content]
    plain = ask(c, QUESTION, temperature=0, max_tokens=4, logprobs=True)
    # +100 on one token id makes it every token of the answer.
    forced = ask(c, QUESTION, temperature=0, max_tokens=4, logprobs=True, logit_bias={"330": 100})
    assert len(set(tokens(forced))) == 1 and tokens(forced) != tokens(plain)
    for bias, word in [({"99999999": 5}, "vocabulary"), ({"x": 5}, "token ids"), ({"330": 101}, "between")]:
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, "hi", max_tokens=2, logit_bias=bias)
        assert e.value.body["param"] == "logit_bias" and word in e.value.body["message"]


def test_tokenize_and_detokenize_agree_with_the_engine(server):
    c, url = client(server), server.url
    text = "The quick brown fox jumps over 13 lazy dogs."
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text}).json()
    done = c.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0)
    assert r["count"] == len(r["tokens"]) == done.usage.prompt_tokens and r["max_model_len"] == 8192
    assert httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()["prompt"] == text
    messages = [{"role": "user", "content": QUESTION}]
    chat = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert chat["count"] == ask(c, QUESTION, max_tokens=1).usage.prompt_tokens
    for path, body, status, param in [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"model": MODEL, "prompt": "x", "messages": messages}, 400, "prompt"),
        ("/detokenize", {"model": MODEL, "tokens": [10**9]}, 400, "tokens"),
    ]:
        r = httpx.post(f"{url}{path}", json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_unknown_model_raises_not_found(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in str(e.value)


SYSTEM = "You are a careful assistant for a hardware store. Answer briefly and politely. " * 6

# 16 conversations of mixed lengths; four share a long system prompt.
CONVERSATIONS = [
    [{"role": "user", "content": p}]
    for p in ["Say one word.", "Count to five.", QUESTION, "What is 2+2?", "Name a planet.",
              "Spell 'cat' backwards.", "Describe rain " * 12, "What color is the sky?",
              "Give me a number between 1 and 10.", "Translate 'hello' to French.", "Why is ice cold?",
              "List two animals and explain why each one is interesting in a few words."]
] + [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
    for q in ["Do you sell hammers?", "What are your hours?", "Can I return nails?", "Where are the screws?"]
]


def concurrently(server, conversations, **kw) -> list[str]:
    async def run():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        rs = await asyncio.gather(*[
            c.chat.completions.create(model=MODEL, messages=m, temperature=0, **kw) for m in conversations
        ])
        return [r.choices[0].message.content for r in rs]

    return asyncio.run(run())


def test_sixteen_concurrent_requests_match_sequential_ones(server):
    sequential = [client(server).chat.completions.create(model=MODEL, messages=m, temperature=0, max_tokens=24)
                  .choices[0].message.content for m in CONVERSATIONS]
    assert concurrently(server, CONVERSATIONS, max_tokens=24) == sequential


def test_preemption_under_a_small_kv_pool_keeps_outputs(tmp_config):
    # 24 blocks of 16 tokens (SmolLM2: 30 layers x 3 KV heads x 64 x 2 x 2 bytes of f16 a token).
    s = Server(tmp_config(max_num_seqs=8, kv_cache_bytes=24 * 16 * 23040, max_model_len=384))
    try:
        convs = CONVERSATIONS[:8]
        kw = dict(max_tokens=40, extra_body={"ignore_eos": True})
        sequential = [client(s).chat.completions.create(model=MODEL, messages=m, temperature=0, **kw)
                      .choices[0].message.content for m in convs]
        assert metric(s, "switchyard:num_preemptions_total") == 0
        assert concurrently(s, convs, **kw) == sequential
        assert metric(s, "switchyard:num_preemptions_total") > 0
        assert metric(s, "switchyard:kv_cache_usage_perc") == 0
    finally:
        s.stop()


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(server):
    c = client(server)
    system = {"role": "system", "content": "You answer questions about the Rust language. " * 20}
    ask_twice = [[system, {"role": "user", "content": q}] for q in ["What is a trait?", "What is a crate?"]]
    first = c.chat.completions.create(model=MODEL, messages=ask_twice[0], max_tokens=1)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    queries, hits = metric(server, "switchyard:prefix_cache_queries_total"), metric(server, "switchyard:prefix_cache_hits_total")
    r = c.chat.completions.create(model=MODEL, messages=ask_twice[1], max_tokens=1)
    prompt = r.usage.prompt_tokens
    assert metric(server, "switchyard:prefix_cache_queries_total") - queries == prompt
    # Everything up to the user turn was cached, in 16-token blocks, and the
    # answer's usage says how much.
    hit = metric(server, "switchyard:prefix_cache_hits_total") - hits
    assert hit >= prompt - 40 and r.usage.prompt_tokens_details.cached_tokens == hit
    # Streamed usage carries it too.
    chunks = list(c.chat.completions.create(model=MODEL, messages=ask_twice[1], max_tokens=1, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= hit


def test_n_choices_share_one_prompt(server):
    c = client(server)
    r = ask(c, "Name a fruit.", n=3, temperature=1.0, seed=5, max_tokens=12)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in r.choices}) > 1
    assert 3 <= r.usage.completion_tokens <= 3 * 12, "usage counts the tokens of every choice"
    one = ask(c, "Name a fruit.", temperature=0, max_tokens=12).choices[0].message.content
    texts = {0: "", 1: ""}
    for ch in ask(c, "Name a fruit.", n=2, temperature=0, max_tokens=12, stream=True):
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: one, 1: one}
    r = c.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=8, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1] and r.choices[0].text == r.choices[1].text
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, "hi", n=99)
    assert "max_num_seqs" in str(e.value)


def test_completions_seed_stop_and_logprobs(server):
    c = client(server)
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=1.0, seed=1234)
    a = c.completions.create(**kw).choices[0].text
    assert a == c.completions.create(**kw).choices[0].text
    r = c.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop"
    assert "7" not in r.choices[0].text and "6" in r.choices[0].text
    r = c.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(t) == 2 for t in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)


def test_chat_logprobs_and_forced_length(server):
    r = ask(client(server), "Hi", max_tokens=40, temperature=0, logprobs=True, top_logprobs=3,
            extra_body={"ignore_eos": True, "min_tokens": 40})
    content = r.choices[0].logprobs.content
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    assert len(content) == 40 and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


def test_models_health_and_metrics(server):
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    ask(client(server), "Hi", max_tokens=2)
    # Each engine series moves by exactly what one request does (nothing else
    # runs on this server between the two reads).
    m = lambda name: metric(server, f"switchyard:{name}", model_name=MODEL)
    names = ["prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
             "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
             "request_queue_time_seconds_count", "prefix_cache_queries_total", "prefix_cache_hits_total",
             "num_preemptions_total", "e2e_request_latency_seconds_sum"]
    before = {n: m(n) for n in names}
    r = client(server).completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=5,
                                          temperature=0, extra_body={"ignore_eos": True})
    grown = {n: m(n) - before[n] for n in names}
    assert grown["prompt_tokens_total"] == r.usage.prompt_tokens, grown
    assert grown["generation_tokens_total"] == r.usage.completion_tokens == 5, grown
    assert grown["time_to_first_token_seconds_count"] == 1, grown
    assert grown["inter_token_latency_seconds_count"] == 4, grown
    assert grown["e2e_request_latency_seconds_count"] == 1, grown
    assert grown["e2e_request_latency_seconds_sum"] > 0, grown
    assert grown["request_queue_time_seconds_count"] == 1, grown
    assert grown["prefix_cache_queries_total"] == r.usage.prompt_tokens, grown
    assert grown["num_preemptions_total"] == 0, grown
    # Gauges at rest: nothing running or waiting, no block held.
    for gauge in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"]:
        assert m(gauge) == 0, gauge


def test_disconnect_cancels_the_sequence(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Write forever."}],
        "max_tokens": 4000, "ignore_eos": True, "stream": True,
    }) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    for _ in range(50):
        if metric(server, "switchyard:num_requests_running") == 0:
            return
        asyncio.run(asyncio.sleep(0.1))
    pytest.fail("the abandoned sequence kept running")


def test_full_queue_answers_503_with_retry_after(tmp_config):
    s = Server(tmp_config(max_num_seqs=1, max_waiting=1, max_num_batched_tokens=512, max_model_len=2048))
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=120) as c:
                body = {"model": MODEL, "prompt": "Hello", "max_tokens": 64, "ignore_eos": True}
                return await asyncio.gather(*[c.post(f"{s.url}/v1/completions", json=body) for _ in range(6)])

        rs = asyncio.run(burst())
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 503 in codes, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "queue_full"
    finally:
        s.stop()


def test_bad_config_fails_at_start_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    source: { path: /x }\n    engine: { max_num_seqs: 0 }\n")
    p = subprocess.run([binary(), "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert "models[0].engine.max_num_seqs" in p.stderr


def test_completions_batch_token_id_prompts_and_echo(server):
    c = client(server)
    tok = lambda text: httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()["tokens"]
    prompts = ["The capital of France is", "One, two, three,"]
    batch = c.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert sorted(ch.index for ch in batch.choices) == [0, 1, 2, 3]
    singles = [c.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0).choices[0].text for p in prompts]
    by_index = {ch.index: ch.text for ch in batch.choices}
    assert [by_index[0], by_index[1], by_index[2], by_index[3]] == [singles[0], singles[0], singles[1], singles[1]]
    assert batch.usage.prompt_tokens == sum(len(tok(p)) for p in prompts)
    ids = c.completions.create(model=MODEL, prompt=tok(prompts[0]), max_tokens=4, temperature=0)
    assert ids.choices[0].text == singles[0]
    lists = c.completions.create(model=MODEL, prompt=[tok(p) for p in prompts], max_tokens=4, temperature=0)
    assert [ch.text for ch in sorted(lists.choices, key=lambda ch: ch.index)] == singles
    # echo with prompt logprobs and no generation: what log-likelihood harnesses send.
    e = c.completions.create(model=MODEL, prompt=prompts[0], max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = e.choices[0].logprobs
    assert e.choices[0].text == prompts[0] and e.usage.completion_tokens == 0
    assert len(lp.tokens) == len(tok(prompts[0])) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(t) == 1 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == prompts[0] and lp.text_offset[0] == 0
    g = c.completions.create(model=MODEL, prompt=prompts[0], max_tokens=4, echo=True, logprobs=2, temperature=0)
    assert g.choices[0].text == prompts[0] + singles[0]
    assert g.choices[0].logprobs.token_logprobs[:len(lp.tokens)][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    assert len(g.choices[0].logprobs.tokens) == len(lp.tokens) + g.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=MODEL, prompt=prompts[0], max_tokens=0)
    assert err.value.body["param"] == "max_tokens"
    # A streamed echo opens with the prompt, then the tokens as they come.
    chunks = list(c.completions.create(model=MODEL, prompt=prompts[0], max_tokens=4, echo=True, logprobs=2,
                                       temperature=0, stream=True))
    assert chunks[0].choices[0].text == prompts[0]
    assert chunks[0].choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    assert "".join(ch.choices[0].text for ch in chunks) == g.choices[0].text
    offsets = [o for ch in chunks for o in (ch.choices[0].logprobs.text_offset if ch.choices[0].logprobs else [])]
    assert offsets == g.choices[0].logprobs.text_offset
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=MODEL, prompt=prompts[0], max_tokens=0, echo=True, stream=True)
    assert err.value.body["param"] == "echo"


def test_embeddings_of_a_generative_model_are_refused_by_name(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).embeddings.create(model=MODEL, input="hello")
    assert e.value.body["param"] == "model" and "generative" in e.value.body["message"]


def test_best_of_returns_the_most_likely_of_its_samples(server):
    c = client(server)
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=4)
    r = c.completions.create(n=2, best_of=5, logprobs=0, **kw)
    assert [ch.index for ch in r.choices] == [0, 1]
    # Seeded samples repeat: the five candidates are the five of n=5.
    five = c.completions.create(n=5, logprobs=0, **kw)
    best = sorted((sum(ch.logprobs.token_logprobs) for ch in five.choices), reverse=True)[:2]
    assert [sum(ch.logprobs.token_logprobs) for ch in r.choices] == pytest.approx(best, abs=1e-4)
    assert r.usage.completion_tokens == five.usage.completion_tokens
    quiet = c.completions.create(best_of=3, **kw)
    assert len(quiet.choices) == 1 and quiet.choices[0].logprobs is None
    for extra in [dict(n=2, best_of=1), dict(best_of=3, stream=True)]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**kw, **extra)
        assert e.value.body["param"] == "best_of"


def test_every_field_of_the_clients_request_types_is_honoured_or_refused_by_name(server):
    """Walks the `openai` client's own request types: a field with a value
    we honour gets an answer, any other a 400 naming it."""
    import typing

    from openai.types import completion_create_params as completion_params
    from openai.types.chat import completion_create_params as chat_params

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    honoured = {
        "frequency_penalty": 0.1, "presence_penalty": 0.1, "logit_bias": {"330": 1}, "logprobs": True,
        "max_completion_tokens": 2, "max_tokens": 2, "metadata": {"a": "b"}, "n": 1, "seed": 1, "stop": "\n",
        "store": False, "stream": False, "stream_options": {"include_usage": True}, "temperature": 0,
        "top_p": 0.9, "user": "u", "response_format": {"type": "text"}, "tools": [weather],
        "tool_choice": "none", "parallel_tool_calls": False, "top_logprobs": 1, "best_of": 1, "echo": False,
    }
    for url, params, base in [
        ("/v1/chat/completions", chat_params.CompletionCreateParamsBase,
         {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ("/v1/completions", completion_params.CompletionCreateParamsBase,
         {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
    ]:
        fields = set(typing.get_type_hints(params)) | {"stream"}
        for field in sorted(fields - set(base)):
            body = dict(base)
            body[field] = honoured.get(field, "x")
            if field == "top_logprobs":
                body["logprobs"] = True
            if field == "logprobs" and url == "/v1/completions":
                body["logprobs"] = 1
            r = httpx.post(f"{server.url}{url}", json=body, timeout=60)
            if field in honoured:
                assert r.status_code == 200, (url, field, r.text)
            else:
                assert r.status_code == 400 and r.json()["error"]["param"] == field, (url, field, r.text)


def test_an_llm_configured_for_embeddings_serves_them(tmp_config):
    import base64
    import struct

    s = Server(tmp_config(embeddings="true"))
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        texts = ["The cat sat on the mat.", "Stock prices fell sharply."]
        r = c.embeddings.create(model=MODEL, input=texts, encoding_format="float")
        vectors = [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
        assert [len(v) for v in vectors] == [576, 576] and vectors[0] != vectors[1]
        assert all(abs(sum(x * x for x in v) - 1) < 1e-3 for v in vectors)
        ids = [httpx.post(f"{s.url}/tokenize", json={"prompt": t}).json()["tokens"] for t in texts]
        assert r.usage.prompt_tokens == sum(map(len, ids))
        by_ids = c.embeddings.create(model=MODEL, input=ids, encoding_format="float")
        for d, v in zip(by_ids.data, vectors):
            assert d.embedding == pytest.approx(v, abs=1e-6)
        raw = c.embeddings.create(model=MODEL, input=texts[0], encoding_format="base64").data[0].embedding
        assert list(struct.unpack(f"<{576}f", base64.b64decode(raw))) == pytest.approx(vectors[0], abs=1e-6)
    finally:
        s.stop()


def test_serve_a_model_file_the_way_vllm_users_do():
    """`switchyard serve MODEL --port N --served-model-name NAME`."""
    import os

    gguf = os.environ.get("SWITCHYARD_MODEL_GGUF") or subprocess.run(
        [binary(), "models", "fetch"], capture_output=True, text=True, check=True).stdout.split("\t")[1].strip()
    port = free_port()
    s = Server(http=False, args=[gguf, "--port", str(port), "--served-model-name", "smol", "--max-model-len", "1024"])
    try:
        assert s.port == port
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["smol"]
        assert c.models.retrieve("smol").max_model_len == 1024
        r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": QUESTION}], temperature=0)
        assert "Paris" in r.choices[0].message.content
    finally:
        s.stop()


class _Wire:
    """One socket's answers read in order from one buffer (pipelined answers
    must not be read past each other), which an answer read whole leaves open."""

    def __init__(self, sock):
        self.file = sock.makefile("rb")

    def makefile(self, *_args, **_kw):
        return self

    def __getattr__(self, name):
        return getattr(self.file, name)

    def close(self):
        pass

    def answer(self):
        r = http.client.HTTPResponse(self)
        r.begin()
        return r, r.read()


def _post(path, body, *fields, version="HTTP/1.1"):
    data = json.dumps(body).encode()
    head = [f"POST {path} {version}", "host: x", "content-type: application/json",
            f"content-length: {len(data)}", *fields]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def test_one_connection_carries_pipelined_generations_then_other_routes(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        wire = _Wire(s)
        # Two generations, a streamed one, a GET, then a generation again:
        # all sent before any answer is read, all answered in order.
        s.sendall(_post("/v1/completions", body) + _post("/v1/completions", body)
                  + _post("/v1/chat/completions", chat)
                  + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n" + _post("/v1/completions", body))
        texts = []
        for expected in ["completion", "completion", "stream", "health", "completion"]:
            r, data = wire.answer()
            assert r.status == 200, (expected, r.status, data[:200])
            if expected == "completion":
                assert r.getheader("content-length") == str(len(data))
                texts.append(json.loads(data)["choices"][0]["text"])
            elif expected == "stream":
                assert r.getheader("content-type").startswith("text/event-stream")
                assert r.getheader("transfer-encoding") == "chunked"
                assert data.rstrip().endswith(b"data: [DONE]"), data[-100:]
        assert texts[0] == texts[1] == texts[2], "greedy, the same prompt: the same text"
        # A chunked request body, on hyper's side of the connection now.
        data = json.dumps(body).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                  + b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n")
        r, data = wire.answer()
        assert r.status == 200 and json.loads(data)["choices"][0]["text"] == texts[0]


def test_generation_connections_close_when_asked_and_bad_ones_get_protocol_errors(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    for fields, version in [(["connection: close"], "HTTP/1.1"), ([], "HTTP/1.0")]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
            s.sendall(_post("/v1/completions", body, *fields, version=version))
            r, data = _Wire(s).answer()
            assert r.status == 200 and json.loads(data)["choices"][0]["text"], (version, data)
            assert s.recv(1) == b"", "the server closed the connection"
    # An unknown model and a body that is not JSON: OpenAI's error shape on
    # each, and the connection still serves.
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        wire = _Wire(s)
        s.sendall(_post("/v1/completions", {**body, "model": "nope"}))
        r, data = wire.answer()
        assert r.status == 404 and json.loads(data)["error"]["code"] == "model_not_found"
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 5\r\n\r\n{nope")
        r, data = wire.answer()
        assert r.status == 400 and json.loads(data)["error"]["type"] == "invalid_request_error"
        s.sendall(_post("/v1/completions", body))
        r, data = wire.answer()
        assert r.status == 200
