"""executor/gateway.py: the exported gateway's OpenAI port passes each connection to a replica."""

import asyncio
import json
import socket

from executor.gateway import ConnectionBalancer, replica_hosts


def test_replica_hosts_come_from_the_gateways_deployment_addresses():
    kubernetes = ["gateway", "--deployments-addresses", json.dumps({"llm": ["grpc://llm.ns.svc:8080"]})]
    compose = ["gateway", "--deployments-addresses", json.dumps({"llm": ["llm-rep-0:8081", "llm-rep-1:8081"]})]
    assert replica_hosts(kubernetes) == ["llm.ns.svc"]
    assert replica_hosts(compose) == ["llm-rep-0", "llm-rep-1"]


def test_connections_go_round_robin_and_a_client_leaving_closes_the_replicas_connection():
    async def scenario():
        closed = asyncio.Queue()

        def replica(name):
            async def answer(reader, writer):
                while line := await reader.readline():
                    writer.write(f"{name}:{line.decode()}".encode())
                    await writer.drain()
                await closed.put(name)  # the balancer closed its side: the client left
                writer.close()
            return answer

        replicas = [await asyncio.start_server(replica(name), "127.0.0.1", 0) for name in ("a", "b")]
        ports = [server.sockets[0].getsockname()[1] for server in replicas]
        balancer = ConnectionBalancer(0, [("127.0.0.1", ports[0]), ("127.0.1.1", 1), ("127.0.0.1", ports[1])])
        server = await asyncio.start_server(balancer._serve_one, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        answers = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello\n")
            await writer.drain()
            answers.append((await reader.readline()).decode())
            writer.close()
            answers.append(await asyncio.wait_for(closed.get(), 5))
        server.close()
        for replica_server in replicas:
            replica_server.close()
        return answers

    # The unreachable second address is skipped for the next one.
    assert asyncio.run(scenario()) == ["a:hello\n", "a", "b:hello\n", "b", "a:hello\n", "a"]


def test_the_gateway_routes_the_openai_port_where_its_replicas_have_addresses_of_their_own(monkeypatch):
    """compose: one address per replica, no TLS -> the prefix router; Kubernetes (one Service address) or TLS
    -> connections spliced round robin. ``--routing round_robin`` reaches the gateway's Jina routing too."""
    import os
    import sys

    from executor import gateway

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets Jina's command line there

    started = []
    monkeypatch.setattr(gateway.OpenAIRouter, "start", lambda self: started.append(("router", self.targets)))
    monkeypatch.setattr(gateway.ConnectionBalancer, "start", lambda self: started.append(("splice", self.targets)))
    monkeypatch.setattr("jina_cli.main", lambda: None)
    monkeypatch.setattr(gateway.jina_compat, "install", lambda: None)
    compose = ["gateway", "--deployments-addresses", json.dumps({"llm": ["llm-rep-0:8081", "llm-rep-1:8081"]})]
    kubernetes = ["gateway", "--deployments-addresses", json.dumps({"llm": ["grpc://llm.ns.svc:8080"]})]
    monkeypatch.setenv("JINA_LLM_STREAM_ROUTING", "prefix")
    gateway.main(["--openai-port", "8000", *compose])
    gateway.main(["--openai-port", "8000", *kubernetes])
    gateway.main(["--openai-port", "8000", *compose, "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"])
    gateway.main(["--openai-port", "8000", "--routing", "round_robin", *compose])
    assert os.environ["JINA_LLM_STREAM_ROUTING"] == "round_robin"
    assert started == [("router", ["http://llm-rep-0:8000", "http://llm-rep-1:8000"]),
                       ("splice", [("llm.ns.svc", 8000)]),
                       ("splice", [("llm-rep-0", 8000), ("llm-rep-1", 8000)]),
                       ("splice", [("llm-rep-0", 8000), ("llm-rep-1", 8000)])]


def test_the_openai_router_refuses_a_body_larger_than_the_replicas_take_before_buffering_it():
    import httpx

    from executor.gateway import MAX_BODY_BYTES, OpenAIRouter
    from executor.openai_api import Settings

    assert MAX_BODY_BYTES == Settings.max_body_bytes
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    router = OpenAIRouter("127.0.0.1", port, ["http://127.0.0.1:9"]).start()  # no replica needed to refuse
    response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b"x" * (MAX_BODY_BYTES + 1),
                          timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    unreachable = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert unreachable.status_code == 503 and "no replica" in unreachable.json()["error"]["message"]
    assert router.router.in_flight("http://127.0.0.1:9") == 0
