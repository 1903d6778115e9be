"""The default LLM as NVIDIA's LLM benchmarks drive a Triton vLLM model:
genai-perf (pinned, its own venv) over KServe gRPC with the vLLM backend's
inputs and streaming, and over the HTTP generate extension; plain
perf_analyzer on the decoupled model; Triton's statistics of the LLM route
over HTTP and gRPC."""
import json
import os
import subprocess

import httpx
import pytest
import tritonclient.grpc as grpcclient

from conftest import Triton, binary, metric, require_env, wait_for
from test_triton import perf_analyzer, perf_env


@pytest.fixture(scope="module")
def llm():
    gguf = require_env("SWITCHYARD_MODEL_GGUF", "scripts/test.sh fetches the default model")
    s = Triton(None, gguf)
    yield s, os.path.basename(gguf).removesuffix(".gguf")
    s.stop()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The model's tokenizer as a Hugging Face folder, for genai-perf's token counts."""
    out = tmp_path_factory.mktemp("tokenizer") / "smollm2"
    gguf = require_env("SWITCHYARD_MODEL_GGUF", "scripts/test.sh fetches the default model")
    subprocess.run([binary(), "export", gguf, "--out", str(out)], check=True, capture_output=True)
    return out


def genai_perf(args: list[str], cwd) -> subprocess.CompletedProcess:
    exe = require_env("SWITCHYARD_GENAI_PERF", "scripts/test.sh installs genai-perf into .venv-genai-perf")
    env = perf_env()
    # genai-perf runs the perf_analyzer that tritonclient's wheel carries.
    env["PATH"] = f"{os.path.dirname(perf_analyzer()[0])}:{env['PATH']}"
    return subprocess.run([exe, "profile", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def exported(cwd) -> dict:
    [path] = list(cwd.glob("artifacts/*/profile_export_genai_perf.json"))
    return json.loads(path.read_text())


REQUESTS, MAX_TOKENS = 6, 8
COMMON = ["--num-dataset-entries", str(REQUESTS), "--request-count", str(REQUESTS),
          "--synthetic-input-tokens-mean", "24", "--output-tokens-mean", str(MAX_TOKENS), "--concurrency", "2"]


def profile_counted(server, model, args, cwd) -> dict:
    """genai-perf's exported statistics of a clean run whose requests the
    engine kept within max_tokens by the server's own count of generated
    tokens. genai-perf's `output_sequence_length` re-tokenizes the text it
    received, and sampled text can tokenize into more pieces than were
    generated, so the engine's count is the one that says whether max_tokens
    was honoured."""
    count = lambda name: metric(server, f"switchyard:{name}", missing=0.0, model_name=model)
    requests, tokens = count("e2e_request_latency_seconds_count"), count("generation_tokens_total")
    r = genai_perf(args, cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stats = exported(cwd)
    assert stats["request_count"]["avg"] == REQUESTS
    # A request is counted as ended once the engine lets it go, which may
    # follow its last response by a moment.
    wait_for("the engine to count genai-perf's requests",
             lambda: count("e2e_request_latency_seconds_count") - requests >= REQUESTS, timeout=30)
    generated = count("generation_tokens_total") - tokens
    assert 0 < generated <= REQUESTS * MAX_TOKENS, generated
    return stats


def assert_streamed(stats):
    """A first token before the last, and genai-perf read the streamed text."""
    assert 0 < stats["time_to_first_token"]["avg"] < stats["request_latency"]["avg"]
    assert stats["output_sequence_length"]["max"] > 0


def test_genai_perf_kserve_vllm_streaming_over_grpc(llm, tokenizer, tmp_path):
    server, model = llm
    # max_tokens goes as a string ("8") in sampling_parameters, as to Triton's vLLM backend.
    stats = profile_counted(server, model, [
        "-m", model, "--endpoint-type", "kserve", "--backend", "vllm", "--streaming",
        "-u", server.grpc_url, "--tokenizer", str(tokenizer), *COMMON], tmp_path)
    assert_streamed(stats)


@pytest.mark.parametrize("streaming", [False, True])
def test_genai_perf_generate(llm, tokenizer, tmp_path, streaming):
    server, model = llm
    stats = profile_counted(server, model, [
        "-m", model, "--endpoint-type", "generate", *(["--streaming"] if streaming else []),
        "-u", server.http_url, "--tokenizer", str(tokenizer), *COMMON], tmp_path)
    if streaming:
        assert_streamed(stats)
    else:
        # Without `exclude_input_in_output`, the output repeats the prompt, as Triton's vLLM backend's does.
        assert stats["output_sequence_length"]["min"] >= 24


def test_plain_perf_analyzer_on_the_llm(llm):
    server, model = llm
    # A decoupled model takes --async --streaming over gRPC; every string
    # input (the prompt and sampling_parameters) gets the same JSON text.
    cmd = perf_analyzer() + ["-m", model, "-i", "grpc", "--streaming", "--async", "-u", server.grpc_url,
                             "--string-data", '{"max_tokens": "4"}', "--concurrency-range", "1:2",
                             "-p", "2000", "--max-trials", "4", "--stability-percentage", "999"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=perf_env(), timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Concurrency: 2, throughput:" in r.stdout, r.stdout[-3000:]


def test_statistics_of_the_llm_route(llm):
    server, model = llm
    before = httpx.get(f"{server.url}/v2/models/{model}/stats").json()["model_stats"][0]["inference_count"]
    r = httpx.post(f"{server.url}/v2/models/{model}/generate",
                   json={"text_input": ["Hello"], "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    s = httpx.get(f"{server.url}/v2/models/{model}/stats").json()["model_stats"][0]
    assert s["name"] == model and s["version"] == "1"
    assert s["inference_count"] == before + 1
    inf = s["inference_stats"]
    assert inf["success"]["count"] == s["inference_count"] and inf["success"]["ns"] > 0
    g = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(model, as_json=True)
    assert int(g["model_stats"][0]["inference_count"]) == s["inference_count"]
    # Every model's statistics include the LLM's.
    all_stats = httpx.get(f"{server.url}/v2/models/stats").json()["model_stats"]
    assert any(m["name"] == model for m in all_stats)
    # A version it does not serve is not found, in KServe's error shape.
    r = httpx.get(f"{server.url}/v2/models/{model}/versions/7/stats")
    assert r.status_code == 404 and "version 7" in r.json()["error"]
