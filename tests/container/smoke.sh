#!/usr/bin/env bash
# make container-smoke: build the Dockerfile with podman on a Debian base made here (no registry needed),
# run the image, and get an answer from /chat with the Jina Client. Loopback only; cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
BASE=localhost/jina-llm-stream-base:bookworm
IMAGE=localhost/jina-llm-stream:smoke
PORT=${PORT:-12399}
OPENAI_PORT=${OPENAI_PORT:-12398}
NAME=jina-llm-stream-smoke-$$

need() { command -v "$1" >/dev/null 2>&1; }
if ! need podman || ! need runc || ! need debootstrap; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi

if ! "${PODMAN[@]}" image exists "$BASE"; then
  root=$(mktemp -d)
  echo "making the base image $BASE with debootstrap ..."
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$root" \
    >/dev/null
  tar -C "$root" -c . | "${PODMAN[@]}" import - "$BASE" >/dev/null
  rm -rf "$root"
fi

# Build with this machine's package access: host network, its certificate bundle, and its local wheels
# (the CPU torch wheel lies there; no PyTorch index is reachable from here).
build_args=(--network host --build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
[ -d /opt/wheels ] && build_args+=(--volume /opt/wheels:/opt/wheels:ro --build-arg LOCAL_WHEELS=/opt/wheels)
cert=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-}}}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  build_args+=(--volume "$cert:/etc/ssl/certs/host-ca.crt:ro" --build-arg EXTRA_CA_CERT=/etc/ssl/certs/host-ca.crt)
fi
echo "building $IMAGE ..."
started=$(date +%s)
"${PODMAN[@]}" build "${build_args[@]}" -t "$IMAGE" . >/tmp/jina-llm-stream-container-build.log 2>&1 \
  || { tail -40 /tmp/jina-llm-stream-container-build.log; exit 1; }
echo "built in $(( $(date +%s) - started )) s"

cleanup() { "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
run_started=$(date +%s)
"${PODMAN[@]}" run -d --name "$NAME" --network host --ulimit nofile=1024:1024 --ulimit nproc=1000:1000 \
  "$IMAGE" --port "$PORT" --openai-port "$OPENAI_PORT" >/dev/null
for _ in $(seq 240); do
  logs=$("${PODMAN[@]}" logs "$NAME" 2>&1)
  grep -q "ready to serve" <<<"$logs" && break
  "${PODMAN[@]}" ps --filter "name=$NAME" --format '{{.Names}}' | grep -q "$NAME" || break
  sleep 1
done
echo "container ready in $(( $(date +%s) - run_started )) s"
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" - "$PORT" <<'PY'
import sys
from docarray import DocList
from jina import Client
sys.path.insert(0, ".")
from schemas import Generation, Prompt
answers = Client(host=f"grpc://127.0.0.1:{sys.argv[1]}").post(
    "/chat", inputs=Prompt(message=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                           gen_conf={"max_new_tokens": 20}), return_type=DocList[Generation])
assert "Paris" in answers[0].text, answers
print("container answered /chat:", repr(answers[0].text))
PY
curl -sf "http://127.0.0.1:$OPENAI_PORT/v1/chat/completions" -H "Content-Type: application/json" \
  -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}' \
  | grep -q '"chat.completion"' || { echo "the container's OpenAI API did not answer"; exit 1; }
echo "container answered /v1/chat/completions"
logs=$("${PODMAN[@]}" logs "$NAME" 2>&1)
grep -q "serving the default model SmolLM2-135M-Instruct" <<<"$logs" \
  || { echo "the container log does not mention the default model"; exit 1; }
grep -q "dequantizing" <<<"$logs" && { echo "the container dequantized the model at start: it was not baked in"; exit 1; }
"${PODMAN[@]}" exec "$NAME" whoami | grep -qx app || { echo "the server does not run as the app user"; exit 1; }
echo "container-smoke passed"
