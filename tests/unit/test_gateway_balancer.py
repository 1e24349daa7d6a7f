"""executor/gateway.py: the exported gateway's OpenAI port passes each connection to a replica."""

import asyncio
import json

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
