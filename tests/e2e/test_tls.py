"""TLS on the ports and on the connections Switchyard opens: the `openai`
client and tritonclient (HTTP and gRPC) over TLS with a test CA, plaintext
refused on a TLS port, a certificate replaced on disk served without a
restart, and mTLS: a node that requires client certificates, reached by a
front Switchyard through `https://` and `grpcs://` upstreams that present
one."""
import functools
import ssl
import subprocess
import time

import gevent.ssl
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import MODEL, ROOT, Server, require_env, wait_for

IRIS = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)


def trusting(ca, cert=None):
    """A client context that trusts `ca` and presents `cert` (certificate, key)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(dir, name, ca, *, server: bool):
    """A key and a certificate for `name`, signed by the CA `ca`."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-subj", f"/CN={name}",
            "-out", f"{name}.csr", cwd=dir)
    ext = dir / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n" if server
                   else "extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", ext.name, "-out", f"{name}.pem", cwd=dir)
    return dir / f"{name}.pem", dir / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    dir = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=Switchyard test CA", cwd=dir)
    return dir


@pytest.fixture(scope="module")
def tls_node(pki):
    """A node serving the default model and the Triton repository over TLS
    on both ports; its certificate and key live where the test can replace them."""
    cert, key = issue(pki, "node", "ca", server=True)
    cfg = pki / "node.yaml"
    gguf = require_env("SWITCHYARD_MODEL_GGUF", "scripts/test.sh fetches the default model")
    cfg.write_text(f"""server:
  tls: {{ cert_file: {cert}, key_file: {key}, reload_interval_ms: 200 }}
models:
  - {{ name: {MODEL}, source: {{ path: {gguf} }} }}
model_repository:
  path: {ROOT / "configs" / "model_repository"}
""")
    s = Server(str(cfg), args=["--grpc", "127.0.0.1:0"], client={"verify": trusting(pki / "ca.pem")})
    s.grpc_port = int(s.wait_for_log(r"KServe gRPC on 127\.0\.0\.1:(\d+)"))
    yield s
    s.stop()


def test_openai_client_over_tls(tls_node, pki):
    assert tls_node.url.startswith("https://")
    client = openai.OpenAI(base_url=f"{tls_node.url}/v1", api_key="unused", max_retries=0,
                           http_client=httpx.Client(verify=trusting(pki / "ca.pem")))
    r = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "Say hi."}])
    assert r.usage.completion_tokens == 4
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Say hi."}])) == r.choices[0].message.content


def iris_http(url, ca):
    client = httpclient.InferenceServerClient(
        url, ssl=True, ssl_context_factory=functools.partial(gevent.ssl.create_default_context, cafile=ca))
    x = httpclient.InferInput("input__0", list(IRIS.shape), "FP32")
    x.set_data_from_numpy(IRIS)
    return client.infer("iris_xgb", [x]).as_numpy("output__0")


def iris_grpc(url, **tls):
    client = grpcclient.InferenceServerClient(url, ssl=True, **tls)
    x = grpcclient.InferInput("input__0", list(IRIS.shape), "FP32")
    x.set_data_from_numpy(IRIS)
    return client.infer("iris_xgb", [x]).as_numpy("output__0")


def test_tritonclient_http_and_grpc_over_tls(tls_node, pki):
    ca = str(pki / "ca.pem")
    over_http = iris_http(f"127.0.0.1:{tls_node.port}", ca)
    over_grpc = iris_grpc(f"127.0.0.1:{tls_node.grpc_port}", root_certificates=ca)
    assert over_http.shape == (1, 3) and np.allclose(over_http.sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(over_http, over_grpc, rtol=1e-6)


def test_plaintext_is_refused_on_tls_ports(tls_node):
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_node.port}/health", timeout=5)
    plain = grpcclient.InferenceServerClient(f"127.0.0.1:{tls_node.grpc_port}")
    with pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=5)


def served_cert(port):
    return ssl.get_server_certificate(("127.0.0.1", port))


def test_a_replaced_certificate_is_served_without_restart(tls_node, pki):
    before = {p: served_cert(p) for p in (tls_node.port, tls_node.grpc_port)}
    # A new key and certificate written over the configured files.
    issue(pki, "node", "ca", server=True)
    fresh = ssl.PEM_cert_to_DER_cert((pki / "node.pem").read_text())
    for port in before:
        wait_for(f"port {port} to serve the new certificate",
                 lambda: ssl.PEM_cert_to_DER_cert(served_cert(port)) == fresh, timeout=10)
    # Both still answer, through the CA.
    assert httpx.get(f"{tls_node.url}/health", verify=trusting(pki / "ca.pem")).status_code == 200
    assert iris_grpc(f"127.0.0.1:{tls_node.grpc_port}", root_certificates=str(pki / "ca.pem")).shape == (1, 3)


@pytest.fixture(scope="module")
def mtls(pki, tls_node):
    """A node that requires client certificates (given by vLLM's flags),
    and a plaintext front whose upstreams reach it and the TLS node with one."""
    cert, key = issue(pki, "private", "ca", server=True)
    client_cert, client_key = issue(pki, "front", "ca", server=False)
    ca = pki / "ca.pem"
    private = Server(args=["--model-repository", str(ROOT / "configs" / "model_repository"), "--grpc",
                           "127.0.0.1:0", "--ssl-certfile", str(cert), "--ssl-keyfile",
                           str(key), "--ssl-ca-certs", str(ca)],
                     client={"verify": trusting(ca, (str(client_cert), str(client_key)))})
    private.grpc_port = int(private.wait_for_log(r"KServe gRPC on 127\.0\.0\.1:(\d+)"))
    tls = f"{{ ca_file: {ca}, cert_file: {client_cert}, key_file: {client_key} }}"
    cfg = pki / "front.yaml"
    cfg.write_text(f"""upstreams:
  - {{ name: remote-llm, model: {MODEL}, endpoints: ["{tls_node.url}"], tls: {{ ca_file: {ca} }} }}
  - {{ name: remote-iris, model: iris_xgb, protocol: kserve,
      endpoints: ["grpcs://127.0.0.1:{private.grpc_port}"], tls: {tls} }}
""")
    front = Server(str(cfg), args=["--grpc", "127.0.0.1:0"])
    yield front, private, (str(client_cert), str(client_key)), str(ca)
    front.stop()
    private.stop()


def test_upstreams_reach_tls_and_mtls_nodes(mtls):
    front, _, _, _ = mtls
    r = httpx.post(f"{front.url}/v1/completions", timeout=60,
                   json={"model": "remote-llm", "prompt": "The capital of France is", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    r = httpx.post(f"{front.url}/v2/models/remote-iris/infer", timeout=60, json={
        "inputs": [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": IRIS.ravel().tolist()}]})
    assert r.status_code == 200, r.text
    assert len(r.json()["outputs"][0]["data"]) == 3


def test_mtls_node_refuses_clients_without_a_certificate(mtls):
    _, private, (cert, key), ca = mtls
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{private.url}/health", verify=trusting(ca), timeout=5)
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(f"127.0.0.1:{private.grpc_port}", ssl=True,
                                         root_certificates=ca).is_server_live(client_timeout=5)
    # With the client certificate both ports answer.
    assert httpx.get(f"{private.url}/health", verify=trusting(ca, (cert, key))).status_code == 200
    out = iris_grpc(f"127.0.0.1:{private.grpc_port}", root_certificates=ca, private_key=key,
                    certificate_chain=cert)
    assert out.shape == (1, 3)
