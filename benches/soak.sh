#!/usr/bin/env bash
# The soak test (benches/src/bin/soak.rs) against a release server with every
# front: the default LLM, a model repository (an XGBoost iris classifier built
# with the pinned test clients' xgboost), a registry with keys, default limits.
#   benches/soak.sh [SECONDS] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
conc="${2:-32}"
cargo build --release --locked --bin switchyard --bin soak
[ -x .venv/bin/python ] || { python3 -m venv .venv; .venv/bin/python -m pip install -q -r tests/e2e/requirements.txt; }
dir="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
mkdir -p "$dir/repo/iris/1"
.venv/bin/python - "$dir/repo/iris" <<'PY'
import sys, xgboost as xgb
from sklearn.datasets import load_iris
X, y = load_iris(return_X_y=True)
xgb.XGBClassifier(n_estimators=20, max_depth=3).fit(X, y).get_booster().save_model(sys.argv[1] + "/1/xgboost.json")
open(sys.argv[1] + "/config.pbtxt", "w").write("""backend: "fil"
max_batch_size: 64
input [ { name: "input__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "output__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
dynamic_batching { max_queue_delay_microseconds: 1000 }
parameters [ { key: "model_type" value: { string_value: "xgboost_json" } }, { key: "predict_proba" value: { string_value: "true" } } ]
""")
PY
viewer="soak-viewer-key-0123456789"
# A fixed 1 GiB KV pool, so that resident memory has a stated bound: the
# pool's pages are touched as sequences fill it, and stay.
sed -n '/^models:/,$p' configs/default.yaml \
  | sed 's/kv_cache_memory_fraction: .*/kv_cache_bytes: 1073741824/' > "$dir/models.yaml"
{
  echo "server: { http: 127.0.0.1:18080, grpc: 127.0.0.1:18081, data_dir: $dir/data }"
  echo "auth: { api_keys: [ { name: dashboard, role: viewer, key: $viewer } ] }"
  echo "registry: { reconcile_interval_secs: 10 }"
  echo "model_repository: { path: $dir/repo }"
  cat "$dir/models.yaml"
} > "$dir/config.yaml"
./target/release/switchyard serve --config "$dir/config.yaml" 2> "$dir/server.log" &
pid=$!
for _ in $(seq 600); do
  curl -sf http://127.0.0.1:18080/health >/dev/null && break
  kill -0 "$pid" || { cat "$dir/server.log"; exit 1; }
  sleep 0.5
done
./target/release/soak --url http://127.0.0.1:18080 --pid "$pid" --duration-secs "$secs" \
  --concurrency "$conc" --viewer-key "$viewer"
echo
grep -a "KV cache pool" "$dir/server.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-240
