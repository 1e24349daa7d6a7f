"""`jina_server.py export`: Jina's own Kubernetes and docker-compose manifests, written offline."""

import json
import subprocess

import yaml

from conftest import PYTHON, ROOT

FLAGS = ["--image", "registry.example/jina-llm-stream:1.2", "--model_name", "gpt2", "--replicas", "2",
         "--protocol", "grpc", "http", "--port", "12345", "12346", "--max_batch_size", "8"]


def export(*args):
    result = subprocess.run([PYTHON, "jina_server.py", "export", *args, *FLAGS], cwd=ROOT, capture_output=True,
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


def test_export_refuses_the_openai_port_clearly(tmp_path):
    result = subprocess.run([PYTHON, "jina_server.py", "export", "kubernetes", str(tmp_path / "k8s"),
                             "--openai-port", "8000"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--openai-port cannot be exported" in result.stderr
