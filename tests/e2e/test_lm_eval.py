"""lm-evaluation-harness against Switchyard, as a user runs it: its
`local-completions` model (log-likelihoods through `echo` + prompt
logprobs, token-id prompts, the server's tokenizer through /tokenizer_info
and /tokenize) and `local-chat-completions` model, on task files and data
this test writes: nothing is fetched from a hub."""
import json
import os

import httpx
import pytest

from conftest import MODEL

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in tests/e2e/requirements.txt")

CAPITALS = [
    {"country": "France", "choices": [" Paris", " Rome", " Madrid"], "answer": 0},
    {"country": "Italy", "choices": [" Berlin", " Rome", " Lisbon"], "answer": 1},
    {"country": "Spain", "choices": [" Vienna", " Oslo", " Madrid"], "answer": 2},
    {"country": "Japan", "choices": [" Tokyo", " Cairo", " Lima"], "answer": 0},
]

MC_TASK = """task: switchyard_capitals_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "Question: What is the capital of {{{{country}}}}?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

GEN_TASK = """task: switchyard_capitals_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "What is the capital of {{{{country}}}}? Answer in one word."
doc_to_target: "{{{{choices[answer] | trim}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
"""


def tasks(tmp_path):
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in CAPITALS))
    (tmp_path / "mc.yaml").write_text(MC_TASK.format(data=data))
    (tmp_path / "gen.yaml").write_text(GEN_TASK.format(data=data))
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(tmp_path))


def forced_loglikelihood(server, context, continuation):
    """The continuation's log-likelihood through the generation path: one
    token at a time, forced with logit_bias, reading the model's own
    (pre-bias) logprob of each: incremental decoding, not the scoring pass
    that echo uses."""
    tok = lambda text: httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": text,
                                                                   "add_special_tokens": False}).json()["tokens"]
    ctx, cont = tok(context), tok(continuation)
    total = 0.0
    for i, t in enumerate(cont):
        r = httpx.post(f"{server.url}/v1/completions", json={
            "model": MODEL, "prompt": ctx + cont[:i], "max_tokens": 1, "temperature": 0,
            "logprobs": 0, "logit_bias": {str(t): 100}}, timeout=60).json()
        total += r["choices"][0]["logprobs"]["token_logprobs"][0]
    return total


def test_loglikelihood_task_matches_the_generation_path(server, tmp_path):
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{server.url}/v1/completions", "model": MODEL, "tokenizer_backend": "remote",
                    "max_retries": 1},
        tasks=["switchyard_capitals_mc"], task_manager=tasks(tmp_path), log_samples=True)
    assert out["results"]["switchyard_capitals_mc"]["acc,none"] >= 0.5
    samples = out["samples"]["switchyard_capitals_mc"]
    assert len(samples) == len(CAPITALS)
    for s in samples[:2]:
        context = f"Question: What is the capital of {s['doc']['country']}?\nAnswer:"
        for choice, resp in zip(s["doc"]["choices"], s["resps"]):
            ll = resp[0][0]
            assert abs(ll - forced_loglikelihood(server, context, choice)) < 1e-3, (choice, ll)


def test_generate_until_task_runs_on_completions_and_chat(server, tmp_path):
    manager = tasks(tmp_path)
    for model, url, extra in [
        ("local-completions", "/v1/completions", {"tokenizer_backend": "remote"}),
        ("local-chat-completions", "/v1/chat/completions", {}),
    ]:
        out = lm_eval.simple_evaluate(
            model=model, model_args={"base_url": f"{server.url}{url}", "model": MODEL, "max_retries": 1, **extra},
            tasks=["switchyard_capitals_gen"], task_manager=manager, apply_chat_template=model.endswith("chat-completions"))
        result = out["results"]["switchyard_capitals_gen"]
        assert "exact_match,none" in result, result
        answers = [s["resps"][0][0] for s in out["samples"]["switchyard_capitals_gen"]]
        if model == "local-chat-completions":
            assert sum(c["choices"][c["answer"]].strip() in a for c, a in zip(CAPITALS, answers)) >= 2, answers
