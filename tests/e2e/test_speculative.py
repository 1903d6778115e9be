"""Speculative decoding (n-gram prompt lookup) through the `openai` client:
greedy outputs and their logprobs are the ones the server without
speculation gives, one request at a time and 16 at once in a KV pool small
enough to preempt, with prefix caching on; proposals were made and accepted
(vLLM's spec_decode metrics)."""
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import subprocess

from conftest import MODEL, ROOT, Server, binary, metric, require_env

TEXT = ("Alice Smith (alice@example.com) met Bob Jones (bob.jones@example.org) in Paris on 3 March 2021. "
        "They discussed the Q3 budget of 45,000 euros with Carol White (carol@white.net).")
TASKS = ["List every email address in this text, one per line.",
         "Repeat this text exactly, then say 'done'.",
         "Extract every person's name and email from this text as a JSON list.",
         "Correct any grammar mistakes in this text and return it."]
PROMPTS = [f"{t}\n\n{TEXT}" for t in TASKS] * 4


def spec_config(tmp_path, speculative: str) -> str:
    """The default model in a pool of about 32 blocks of 16 tokens,
    speculating as `speculative` says: a request of ~150 tokens takes up to
    10 of them, so four or more running together preempt, even when the
    sixteen arrive spread out (65 blocks let that pass without preempting
    in one run of three)."""
    default = (ROOT / "configs" / "default.yaml").read_text()
    head, _, _ = default.partition("    engine:\n")
    config = tmp_path / "config.yaml"
    config.write_text(head + "    engine:\n      kv_cache_bytes: 12000000\n      speculative:\n"
                      "        num_speculative_tokens: 4\n        disable_by_batch_size: null\n" + speculative)
    return str(config)


def source_block() -> str:
    """The default model's `source:` mapping, as the draft's."""
    default = (ROOT / "configs" / "default.yaml").read_text()
    body = default.split("    source:\n", 1)[1].split("    engine:\n", 1)[0]
    return "".join("    " + line + "\n" for line in body.splitlines())


@pytest.fixture(scope="module", params=["ngram", "draft"])
def speculating(request, tmp_path_factory):
    method = f"        method: {request.param}\n"
    if request.param == "draft":
        # The default model drafting for itself: every proposal is the
        # target's own greedy choice.
        method += "        draft:\n" + source_block()
    s = Server(spec_config(tmp_path_factory.mktemp("spec"), method))
    s.method = request.param
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
    accepted = metric(speculating, "switchyard:spec_decode_num_accepted_tokens_total", **name)
    drafted = metric(speculating, "switchyard:spec_decode_num_draft_tokens_total", **name)
    assert 0 < accepted <= drafted
    assert metric(speculating, "switchyard:spec_decode_num_drafts_total", **name) > 0
    assert metric(speculating, "switchyard:spec_decode_num_accepted_tokens_per_pos_total", position="0", **name) > 0
    assert metric(speculating, "switchyard:num_preemptions_total", **name) > 0
    if speculating.method == "draft":
        assert accepted == drafted, "a model drafting for itself is always right"


def test_a_draft_with_another_vocabulary_is_refused_at_start(tmp_path):
    gemma = require_env("SWITCHYARD_GEMMA_GGUF", "scripts/test.sh assembles Gemma 3 270M")
    config = spec_config(tmp_path, f"        method: draft\n        draft: {{ path: {gemma} }}\n")
    out = subprocess.run([binary(), "serve", "--config", config, "--port", "0"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert "speculative.draft: its vocabulary differs" in out.stderr, out.stderr[-2000:]
