"""Per-key rate limits on every inference front: a key over its
`requests_per_second` or its `tokens_per_minute` gets 429 with `Retry-After`
in the protocol's own shape (OpenAI error JSON, KServe `{"error"}`, gRPC
RESOURCE_EXHAUSTED with `retry-after`), and other keys are unaffected."""
import time

import numpy as np
import pytest
import httpx
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import MODEL, ROOT, Server, Triton, require_env

LIMITED = "a-limited-batch-job-key-0001"
VIEWER = "a-viewer-key-for-dashboards-01"
OTHER = "an-unlimited-application-key-01"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("limits") / "config.yaml"
    cfg.write_text(f"""auth:
  inference_requires_key: true
  api_keys:
    - {{ name: batch, role: invoke, key: {LIMITED}, requests_per_second: 1 }}
    - {{ name: app, role: invoke, key: {OTHER} }}
    - {{ name: viewer, role: viewer, key: {VIEWER} }}
server: {{ data_dir: {cfg.parent / "data"} }}
registry: {{}}
model_repository:
  path: {ROOT / "configs" / "model_repository"}
""")
    s = Triton(None, config=str(cfg))
    yield s
    s.stop()


def test_every_front_answers_401_without_a_key_and_403_for_a_wrong_role(server):
    """With `auth.inference_requires_key`: the OpenAI API, KServe over HTTP
    and gRPC, repository control, the registry and the console's data."""
    viewer, invoke = {"Authorization": f"Bearer {VIEWER}"}, {"Authorization": f"Bearer {OTHER}"}
    calls = [
        ("OpenAI", lambda h: httpx.get(f"{server.url}/v1/models", headers=h), invoke, viewer),
        ("KServe HTTP", lambda h: httpx.post(f"{server.url}/v2/models/iris_xgb/infer", json=INFER, headers=h),
         invoke, viewer),
        ("repository control", lambda h: httpx.post(f"{server.url}/v2/repository/models/iris_xgb/unload", headers=h),
         None, invoke),
        ("registry", lambda h: httpx.get(f"{server.url}/v1/registry/models", headers=h), viewer, invoke),
        ("console data", lambda h: httpx.get(f"{server.url}/v1/routes", headers=h), viewer, invoke),
        ("console identity", lambda h: httpx.get(f"{server.url}/v1/registry/whoami", headers=h), viewer, invoke),
    ]
    for front, call, allowed, wrong in calls:
        assert call({}).status_code == 401, front
        assert call({"Authorization": "Bearer not-a-configured-key-000"}).status_code == 401, front
        r = call(wrong)
        assert r.status_code == 403, (front, r.text)
        assert "error" in r.json(), front
        if allowed:
            assert call(allowed).status_code == 200, front
    # The console's pages carry no data: they load, and sign-in is theirs.
    assert httpx.get(f"{server.url}/ui/routes").status_code == 200
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = grpcclient.InferInput("input__0", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
    for headers, code in [({}, "StatusCode.UNAUTHENTICATED"),
                          ({"authorization": f"Bearer {VIEWER}"}, "StatusCode.PERMISSION_DENIED")]:
        with pytest.raises(InferenceServerException) as e:
            client.infer("iris_xgb", [x], headers=headers)
        assert e.value.status() == code, e.value
    client.infer("iris_xgb", [x], headers={"authorization": f"Bearer {OTHER}"})


def burst(call, n=6):
    return [call() for _ in range(n)]


INFER = {"inputs": [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


def call(url, headers):
    if url.endswith("/infer"):
        return httpx.post(url, json=INFER, headers=headers)
    return httpx.get(url, headers=headers)


def test_openai_and_kserve_http_answer_429_with_retry_after(server):
    for url, shape in [(f"{server.url}/v1/models", "openai"), (f"{server.url}/v2/models/iris_xgb/infer", "kserve")]:
        limited = burst(lambda: call(url, {"Authorization": f"Bearer {LIMITED}"}))
        refused = [r for r in limited if r.status_code == 429]
        assert limited[0].status_code == 200 and refused, [r.status_code for r in limited]
        r = refused[0]
        assert int(r.headers["retry-after"]) >= 1
        body = r.json()
        if shape == "openai":
            assert "batch" in body["error"]["message"] and "requests per second" in body["error"]["message"]
        else:
            assert "batch" in body["error"]
        # The other key is not held by the first one's rate.
        assert all(r.status_code == 200 for r in burst(lambda: call(url, {"x-api-key": OTHER})))
        # After the wait it names, the limited key is let through again.
        time.sleep(int(r.headers["retry-after"]))
        assert call(url, {"Authorization": f"Bearer {LIMITED}"}).status_code == 200
        time.sleep(int(r.headers["retry-after"]))


def test_kserve_grpc_answers_resource_exhausted(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = grpcclient.InferInput("input__0", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
    errors = []
    for _ in range(6):
        try:
            client.infer("iris_xgb", [x], headers={"authorization": f"Bearer {LIMITED}"})
        except InferenceServerException as e:
            errors.append(e)
    assert errors and "RESOURCE_EXHAUSTED" in str(errors[0].status()), [str(e) for e in errors]
    for _ in range(6):
        client.infer("iris_xgb", [x], headers={"authorization": f"Bearer {OTHER}"})


BUDGETED = "a-key-with-a-token-budget-01"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    gguf = require_env("SWITCHYARD_MODEL_GGUF", "scripts/test.sh fetches the default model")
    cfg = tmp_path_factory.mktemp("tokens") / "config.yaml"
    cfg.write_text(f"""auth:
  inference_requires_key: true
  api_keys:
    - {{ name: budgeted, role: invoke, key: {BUDGETED}, tokens_per_minute: 60 }}
    - {{ name: app, role: invoke, key: {OTHER} }}
models:
  - {{ name: {MODEL}, source: {{ path: {gguf} }} }}
""")
    s = Server(str(cfg))
    yield s
    s.stop()


def complete(server, key):
    return httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": MODEL, "prompt": "Count: one two three", "max_tokens": 32,
                            "ignore_eos": True})


def test_a_token_budget_is_charged_prompt_and_output(llm):
    # 60 tokens a minute (one a second): the first call (~37 tokens) fits,
    # the second overdraws the budget, the third waits for it to refill.
    first, second = complete(llm, BUDGETED), complete(llm, BUDGETED)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    spent = sum(r.json()["usage"]["total_tokens"] for r in (first, second))
    assert spent > 60
    r = complete(llm, BUDGETED)
    assert r.status_code == 429, r.text
    assert "budgeted" in r.json()["error"]["message"] and "tokens per minute" in r.json()["error"]["message"]
    # About one second per token overdrawn (time has passed since).
    assert 1 <= int(r.headers["retry-after"]) <= spent - 60 + 1
    # The same key on KServe generate is held too; another key is not.
    g = httpx.post(f"{llm.url}/v2/models/{MODEL}/generate", headers={"x-api-key": BUDGETED},
                   json={"text_input": "Hi", "parameters": {"max_tokens": 2}})
    assert g.status_code == 429 and "tokens per minute" in g.json()["error"], g.text
    assert complete(llm, OTHER).status_code == 200
