#!/usr/bin/env bash
# make container-smoke, second part: bring the docker-compose export up with podman-compose (in a venv of its
# own, pinned) on the image smoke.sh built, and check it through its published ports (compose_check.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${JINA_LLM_STREAM_CACHE:-$HOME/.cache/jina-llm-stream}
TOOL=$CACHE/podman-compose-1.6.0
if [ ! -x "$TOOL/bin/podman-compose" ]; then
  python3 -m venv "$TOOL"
  "$TOOL/bin/pip" install -q --disable-pip-version-check podman-compose==1.6.0
fi
# podman-compose calls plain `podman`: the settings smoke.sh passes as flags come from a containers.conf.
conf=$(mktemp)
trap 'rm -f "$conf"' EXIT
cat >"$conf" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
CONTAINERS_CONF=$conf IMAGE=${IMAGE:-localhost/jina-llm-stream:smoke} PODMAN_COMPOSE="$TOOL/bin/podman-compose" \
  "$PYTHON" tests/container/compose_check.py
