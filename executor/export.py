"""Kubernetes and docker-compose manifests: Jina's own exporters, then made to run this project everywhere.

Jina writes a gateway that runs its stock image and a worker per replica. Rewritten here:
- the gateway runs the project's image through ``python -m executor.gateway`` (executor/gateway.py): Jina's
  gateway with the fixes of executor/jina_compat.py, as under ``jina_server.py``;
- with an OpenAI port, every worker serves the API (executor/openai_api.py) and the gateway takes its
  connections on that port and passes each to a replica; the port is published where the gateway's are;
- the gateway routes by prefix (executor/router.py) unless ``--routing round_robin`` was given, and continues
  streams of a dead replica ``--migrations`` times (default 1);
- docker-compose: Jina mounts the host's ``~/.cache/jina`` over the worker's ``/app``, which hides the
  project's code there; the workspace moves to ``/tmp`` and the mount goes. Its workers run on one host, so
  each computes on its share of the cores (``JINA_LLM_STREAM_CPU_THREADS=share:N``, executor.py).
"""

from pathlib import Path

import yaml

from .router import DEFAULT_MIGRATIONS

GATEWAY_MODULE = ["python", "-m", "executor.gateway"]


def rewrite_kubernetes(folder: str, image: str, openai_port: int | None, routing: str = "prefix",
                       migrations: int = DEFAULT_MIGRATIONS) -> None:
    for path in Path(folder).rglob("*.yml"):
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
        extra = []
        for document in documents:
            kind, name = document["kind"], document["metadata"]["name"]
            if kind == "Deployment" and name == "gateway":
                container = document["spec"]["template"]["spec"]["containers"][0]
                container["image"] = image
                container["command"] = GATEWAY_MODULE + _gateway_flags(openai_port, routing, migrations)
                if openai_port is not None:
                    container["ports"].append({"containerPort": openai_port})
                    extra.append(_service("gateway-openai", "gateway", openai_port, document))
            elif kind == "Deployment" and openai_port is not None:  # a worker: its replicas serve the API
                container = document["spec"]["template"]["spec"]["containers"][0]
                container["ports"].append({"containerPort": openai_port})
            elif kind == "Service" and name != "gateway" and not name.startswith("gateway-") and openai_port:
                document["spec"]["ports"].append({"name": "openai", "port": openai_port, "protocol": "TCP",
                                                  "targetPort": openai_port})
        path.write_text(yaml.safe_dump_all(documents + extra, sort_keys=False))


def _service(name: str, app: str, port: int, deployment: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"labels": {"app": name}, "name": name, "namespace": deployment["metadata"]["namespace"]},
            "spec": {"ports": [{"name": "port", "port": port, "protocol": "TCP", "targetPort": port}],
                     "selector": {"app": app}, "type": "ClusterIP"}}


def rewrite_docker_compose(file: str, image: str, openai_port: int | None, routing: str = "prefix",
                           migrations: int = DEFAULT_MIGRATIONS) -> None:
    path = Path(file)
    compose = yaml.safe_load(path.read_text())
    workers = [name for name in compose["services"] if name != "gateway"]
    for name, service in compose["services"].items():
        if name == "gateway":
            service["image"] = image
            service["entrypoint"] = GATEWAY_MODULE + _gateway_flags(openai_port, routing, migrations)
            if openai_port is not None:
                service.setdefault("expose", []).append(openai_port)
                service.setdefault("ports", []).append(f"{openai_port}:{openai_port}")
        else:
            service.pop("volumes", None)
            _set_environment(service, "JINA_LLM_STREAM_CPU_THREADS", f"share:{len(workers)}")
            command = service["command"]
            if "--workspace" in command:
                command[command.index("--workspace") + 1] = "/tmp/jina-workspace"
    path.write_text(yaml.safe_dump(compose, sort_keys=False))


def _set_environment(service: dict, name: str, value: str) -> None:
    """Set one variable in a compose service's environment (a mapping, or Jina's list of NAME=value)."""
    environment = service.get("environment") or []
    if isinstance(environment, dict):
        environment[name] = value
    else:
        environment = [item for item in environment if not str(item).startswith(f"{name}=")] + [f"{name}={value}"]
    service["environment"] = environment


def _gateway_flags(openai_port: int | None, routing: str, migrations: int) -> list:
    """executor/gateway.py's own flags, those that differ from its defaults."""
    return ([] if openai_port is None else ["--openai-port", str(openai_port)]) + \
        ([] if routing == "prefix" else ["--routing", routing]) + \
        ([] if migrations == DEFAULT_MIGRATIONS else ["--migrations", str(migrations)])
