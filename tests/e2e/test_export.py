"""`jina_server.py export`: Jina's own Kubernetes and docker-compose manifests, written offline."""

import json
import subprocess

import yaml

from conftest import PYTHON, ROOT

FLAGS = ["--image", "registry.example/jina-llm-stream:1.2", "--model_name", "gpt2", "--replicas", "2",
         "--protocol", "grpc", "http", "--port", "12345", "12346", "--max_batch_size", "8"]


def export(*args):
    result = subprocess.run([PYTHON, "jina_server.py", "export", *args[:2], *FLAGS, *args[2:]], cwd=ROOT, capture_output=True,
                            text=True, timeout=180, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                                         "NO_PROXY": "*", "HOME": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]


def uses_with_of(command):
    return json.loads(command[command.index("--uses-with") + 1])


def test_kubernetes_manifests_carry_image_arguments_replicas_and_ports(tmp_path):
    export("kubernetes", str(tmp_path / "k8s"))
    documents = [d for f in sorted((tmp_path / "k8s").rglob("*.yml")) for d in yaml.safe_load_all(f.read_text()) if d]
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    executor = deployments["llm"]
    container = executor["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/jina-llm-stream:1.2"
    assert executor["spec"]["replicas"] == 2
    assert uses_with_of(container["args"]) | {} == {**uses_with_of(container["args"]),
                                                   "model_name": "gpt2", "max_batch_size": 8}
    gateway_args = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["args"]
    protocols = gateway_args[gateway_args.index("--protocol") + 1:][:2]
    assert protocols == ["GRPC", "HTTP"]
    # Jina's Kubernetes export gives the gateway its own fixed ports, one Service per protocol.
    gateway_ports = {p["port"] for d in documents if d["kind"] == "Service" and d["metadata"]["name"].startswith("gateway")
                     for p in d["spec"]["ports"]}
    assert gateway_ports == {8080, 8081}


def test_docker_compose_manifest(tmp_path):
    target = tmp_path / "docker-compose.yml"
    export("docker-compose", str(target))
    services = yaml.safe_load(target.read_text())["services"]
    executors = [s for name, s in services.items() if name.startswith("llm")]
    assert len(executors) == 2 and all(s["image"] == "registry.example/jina-llm-stream:1.2" for s in executors)
    assert uses_with_of(executors[0]["command"])["model_name"] == "gpt2"
    assert {"12345:12345", "12346:12346"} <= set(services["gateway"]["ports"])


def k8s_documents(folder):
    return [d for f in sorted(folder.rglob("*.yml")) for d in yaml.safe_load_all(f.read_text()) if d]


def test_kubernetes_export_runs_the_projects_gateway_and_serves_the_openai_api(tmp_path):
    export("kubernetes", str(tmp_path / "k8s"), "--openai-port", "8000")
    result = subprocess.run([str(ROOT / ".venv/bin/kubernetes-validate"), "--strict", "-k", "1.31",
                             *map(str, sorted((tmp_path / "k8s").rglob("*.yml")))], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    documents = k8s_documents(tmp_path / "k8s")
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    worker = deployments["llm"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["image"] == worker["image"] == "registry.example/jina-llm-stream:1.2"
    assert gateway["command"] == ["python", "-m", "executor.gateway", "--openai-port", "8000"]
    assert gateway["args"][0] == "gateway"
    assert uses_with_of(worker["args"])["openai_port"] == 8000
    assert {"containerPort": 8000} in gateway["ports"] and {"containerPort": 8000} in worker["ports"]
    assert [p["port"] for p in services["gateway-openai"]["spec"]["ports"]] == [8000]
    assert services["gateway-openai"]["spec"]["selector"] == {"app": "gateway"}
    assert 8000 in [p["port"] for p in services["llm"]["spec"]["ports"]], "the gateway reaches the replicas' API"
    for container in (gateway, worker):  # the probes ask Jina's own ping, which the project's image has
        assert container["startupProbe"]["exec"]["command"][:2] == ["jina", "ping"]
        assert container["livenessProbe"]["exec"]["command"][:2] == ["jina", "ping"]


def test_docker_compose_export_runs_the_projects_gateway_and_publishes_the_openai_port(tmp_path):
    target = tmp_path / "docker-compose.yml"
    export("docker-compose", str(target), "--openai-port", "8000")
    services = yaml.safe_load(target.read_text())["services"]
    gateway = services["gateway"]
    assert gateway["image"] == "registry.example/jina-llm-stream:1.2"
    assert gateway["entrypoint"] == ["python", "-m", "executor.gateway", "--openai-port", "8000"]
    assert "8000:8000" in gateway["ports"]
    workers = [s for name, s in services.items() if name.startswith("llm")]
    assert all(uses_with_of(w["command"])["openai_port"] == 8000 for w in workers)
    # Jina mounted the host's ~/.cache/jina over /app, where the project's code is.
    assert all("volumes" not in w and "/tmp/jina-workspace" in w["command"] for w in workers)
    # The workers share one host: each computes on its share of the cores (executor.share_the_cpu).
    environments = [w["environment"] if isinstance(w["environment"], list) else
                    [f"{k}={v}" for k, v in w["environment"].items()] for w in workers]
    assert len(workers) == 2 and all("JINA_LLM_STREAM_CPU_THREADS=share:2" in e for e in environments), environments


def test_the_exported_gateway_routes_by_prefix_unless_told_round_robin(tmp_path):
    target = tmp_path / "docker-compose.yml"
    export("docker-compose", str(target), "--openai-port", "8000", "--routing", "round_robin", "--migrations", "0")
    gateway = yaml.safe_load(target.read_text())["services"]["gateway"]
    assert gateway["entrypoint"] == ["python", "-m", "executor.gateway", "--openai-port", "8000", "--routing",
                                     "round_robin", "--migrations", "0"]
