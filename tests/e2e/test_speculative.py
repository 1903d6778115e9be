"""Speculative decoding (n-gram prompt lookup) through the `openai` client:
greedy outputs and their logprobs are the ones the server without
speculation gives, one request at a time and 16 at once in a KV pool small
enough to preempt, with prefix caching on; proposals were made and accepted
(vLLM's spec_decode metrics)."""
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import MODEL, ROOT, Server, metric

TEXT = ("Alice Smith (alice@example.com) met Bob Jones (bob.jones@example.org) in Paris on 3 March 2021. "
        "They discussed the Q3 budget of 45,000 euros with Carol White (carol@white.net).")
TASKS = ["List every email address in this text, one per line.",
         "Repeat this text exactly, then say 'done'.",
         "Extract every person's name and email from this text as a JSON list.",
         "Correct any grammar mistakes in this text and return it."]
PROMPTS = [f"{t}\n\n{TEXT}" for t in TASKS] * 4


@pytest.fixture(scope="module")
def speculating(tmp_path_factory):
    default = (ROOT / "configs" / "default.yaml").read_text()
    head, _, _ = default.partition("    engine:\n")
    # About 65 blocks of 16 tokens: 16 requests of ~150 tokens each preempt.
    config = tmp_path_factory.mktemp("spec") / "config.yaml"
    config.write_text(head + "    engine:\n      kv_cache_bytes: 24000000\n      speculative:\n"
                      "        method: ngram\n        num_speculative_tokens: 4\n"
                      "        disable_by_batch_size: null\n")
    s = Server(str(config))
    yield s
    s.stop()


def ask(server, prompt):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=64,
                                  temperature=0, logprobs=True, top_logprobs=2)
    lp = [(t.token, round(t.logprob, 4)) for t in r.choices[0].logprobs.content]
    return r.choices[0].message.content, r.choices[0].finish_reason, lp


def test_greedy_outputs_equal_plain_decoding_alone_and_sixteen_at_once(server, speculating):
    plain = [ask(server, p) for p in PROMPTS[:4]]
    assert [ask(speculating, p) for p in PROMPTS[:4]] == plain
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: ask(speculating, p), PROMPTS))
    assert together == plain * 4
    name = {"model_name": MODEL}
    accepted = metric(speculating, "switchyard:spec_decode_num_accepted_tokens", **name)
    drafted = metric(speculating, "switchyard:spec_decode_num_draft_tokens", **name)
    assert 0 < accepted < drafted
    assert metric(speculating, "switchyard:spec_decode_num_drafts", **name) > 0
    assert metric(speculating, "switchyard:spec_decode_num_accepted_tokens_per_pos", position="0", **name) > 0
    assert metric(speculating, "switchyard:num_preemptions", **name) > 0
