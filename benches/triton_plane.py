"""Triton plane benchmark: perf_analyzer (gRPC, concurrency 1/8/32) against
Switchyard for an ONNX model, an XGBoost model and MiniLM, with dynamic
batching on and off; anchors in the same run: the same models in their own
libraries (onnxruntime, xgboost inplace_predict) at the request's batch size,
and our tree evaluator against XGBoost's predict at batch 1,024.

    cargo build --release -p gateway -p benches
    .venv/bin/python benches/triton_plane.py
"""
import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from triton_repo import build, fil_config, write_model  # noqa: E402


def perf_env():
    import nvidia.cuda_runtime
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{Path(nvidia.cuda_runtime.__path__[0]) / 'lib'}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


SENTENCES = [
    "A man is playing a guitar.", "The new movie is awesome.", "A woman is slicing an onion.",
    "The stock market fell sharply today.", "Two dogs are running through a field.",
    "How do I reset my password?", "The weather will be sunny tomorrow.", "She is reading a book in the park.",
    "Our order has not arrived yet.", "The cat sleeps on the warm windowsill.", "Can you recommend a good restaurant?",
    "The train to Berlin is delayed by twenty minutes.", "He fixed the bug before the release.",
    "Children are playing football after school.", "Please send me the invoice for last month.",
    "The museum opens at nine in the morning.",
]


def perf(model, url, concurrency, window_ms, input_data=None):
    out = Path(tempfile.mktemp(suffix=".csv"))
    cmd = [str(Path(sys.executable).parent / "perf_analyzer"), "-m", model, "-i", "grpc", "-u", url,
           "--concurrency-range", str(concurrency), "-p", str(window_ms), "-s", "50", "--max-trials", "8", "-f", str(out)]
    if input_data:
        cmd += ["--input-data", str(input_data)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=perf_env(), timeout=600)
    if r.returncode != 0:
        print(f"perf_analyzer failed for {model} c={concurrency}: {r.stdout[-400:]}", flush=True)
        return float("nan"), float("nan")
    row = next(csv.DictReader(out.open()))
    return float(row["Inferences/Second"]), float(row["p99 latency"]) / 1000.0


def library_rate(fn, seconds=3.0):
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "switchyard"))
    ap.add_argument("--tree-bench", default=str(ROOT / "target" / "release" / "tree_predict"))
    ap.add_argument("--window-ms", type=int, default=3000)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--models", default="iris_onnx,fraud_xgb,minilm")
    ap.add_argument("--skip-trees", action="store_true", help="leave out the evaluator-vs-XGBoost comparison")
    args = ap.parse_args()

    import onnxruntime as ort
    import xgboost as xgb
    from sklearn.datasets import make_classification

    work = Path(tempfile.mkdtemp(prefix="switchyard-bench-"))
    repo = work / "repo"
    repo.mkdir()
    expected = build(repo, Path.home() / ".cache" / "switchyard" / "test-models")
    # A tree model of a realistic size: 300 trees of depth 6 over 32 features.
    X, y = make_classification(n_samples=20000, n_features=32, n_informative=16, random_state=0)
    X = X.astype(np.float32)
    big = xgb.XGBClassifier(n_estimators=300, max_depth=6, random_state=0).fit(X, y)
    big.save_model(work / "fraud_xgb.json")
    write_model(repo, "fraud_xgb", fil_config("fraud_xgb", 32, 1, {"model_type": "xgboost_json"}, max_batch=1024),
                {"xgboost.json": work / "fraud_xgb.json"})
    models = args.models.split(",")
    shutil.copy(repo / "iris_onnx" / "1" / "model.onnx", work / "iris.onnx")
    # MiniLM reads real sentences (perf_analyzer's random bytes would be ~130 tokens each).
    sentences = work / "sentences.json"
    sentences.write_text(json.dumps({"data": [{"text": {"content": [t], "shape": [1]}} for t in SENTENCES]}))
    for m in models:
        d = repo / f"{m}_nobatch"
        shutil.copytree(repo / m, d)
        cfg = (d / "config.pbtxt").read_text()
        cfg = re.sub(r"dynamic_batching \{[^}]*\}", "", cfg).replace(f'name: "{m}"', f'name: "{m}_nobatch"')
        (d / "config.pbtxt").write_text(cfg)
    for m in models:
        cfg = repo / m / "config.pbtxt"
        cfg.write_text(re.sub(r"max_queue_delay_microseconds: \d+", "max_queue_delay_microseconds: 200", cfg.read_text()))
    for m in list(os.listdir(repo)):
        if m not in models and not m.endswith("_nobatch"):
            shutil.rmtree(repo / m)

    port, grpc_port = 18600, 18601
    server = subprocess.Popen([args.bin, "serve", "--model-repository", str(repo), "--http", f"127.0.0.1:{port}",
                               "--grpc", f"127.0.0.1:{grpc_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import tritonclient.grpc as g
        client = g.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        for _ in range(300):
            try:
                if all(client.is_model_ready(m) for m in models):
                    break
            except Exception:
                pass
            time.sleep(0.2)
        x1 = expected["iris_onnx"]["X"][:1]
        booster = big.get_booster()
        f1 = X[:1]

        def onnx_anchor():
            sess = ort.InferenceSession(str(work / "iris.onnx"), providers=["CPUExecutionProvider"])
            return library_rate(lambda: sess.run(None, {"X": x1}))

        anchor_of = {
            "iris_onnx": ("onnxruntime run, batch 1", onnx_anchor),
            "fraud_xgb": ("xgboost inplace_predict, batch 1", lambda: library_rate(lambda: booster.inplace_predict(f1))),
            "minilm": ("(no Python anchor here)", lambda: None),
        }
        anchors = {m: (anchor_of[m][0], anchor_of[m][1]()) for m in models}
        rows = []
        for m in models:
            for c in [int(c) for c in args.concurrency.split(",")]:
                data = sentences if m == "minilm" else None
                on = perf(m, f"127.0.0.1:{grpc_port}", c, args.window_ms, data)
                off = perf(f"{m}_nobatch", f"127.0.0.1:{grpc_port}", c, args.window_ms, data)
                rows.append((m, c, on, off))
                print(f"{m} c={c}: batching {on[0]:.0f}/s p99 {on[1]:.2f} ms; no batching {off[0]:.0f}/s p99 {off[1]:.2f} ms", flush=True)
    finally:
        server.terminate()
        server.wait()

    print("\n| model | concurrency | batching infer/s | p99 ms | no batching infer/s | p99 ms | batched ÷ unbatched | library in-process infer/s | ours (batching) ÷ library |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, c, on, off in rows:
        name, rate = anchors[m]
        lib = f"{rate:.0f} ({name})" if rate else name
        ratio = f"{on[0] / rate:.2f}" if rate else "—"
        print(f"| {m} | {c} | {on[0]:.0f} | {on[1]:.2f} | {off[0]:.0f} | {off[1]:.2f} | {on[0] / off[0]:.2f} | {lib} | {ratio} |")

    if args.skip_trees:
        shutil.rmtree(work)
        return
    # Tree evaluator vs XGBoost's own CPU predict, batch 1,024, same rows.
    batch = X[:1024].copy()
    feats = work / "features.bin"
    feats.write_bytes(batch.tobytes())
    ours = subprocess.run([args.tree_bench, "--model", str(work / "fraud_xgb.json"), "--batch", "1024", "--features", str(feats)],
                          capture_output=True, text=True, check=True)
    ours = json.loads(ours.stdout)
    times = []
    for _ in range(200):
        t = time.perf_counter()
        booster.inplace_predict(batch)
        times.append(time.perf_counter() - t)
    theirs = 1024 / sorted(times)[len(times) // 2]
    print("\n| tree evaluator, batch 1,024, 300 trees depth 6 | rows/s |")
    print("|---|---|")
    print(f"| Switchyard `Forest::predict` | {ours['rows_per_s']:.0f} |")
    print(f"| XGBoost `inplace_predict` ({os.cpu_count()} threads) | {theirs:.0f} |")
    print(f"| ratio (ours ÷ XGBoost) | {ours['rows_per_s'] / theirs:.2f} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
