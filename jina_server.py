"""Command line: serve a Hugging Face causal LM with Jina.

    python jina_server.py                        # the default model (SmolLM2-135M-Instruct) on port 12345 (gRPC)
    python jina_server.py --model_name gpt2      # any hub name, local folder or GGUF file
    python jina_server.py --protocol grpc http --port 12345 12346 --replicas 2 --monitoring --port-monitoring 9090
    python jina_server.py export kubernetes k8s/ --image my-registry/jina-llm-stream:1.0

Every Executor argument is a flag of the same name (``--max_batch_size`` or ``--max-batch-size``), so
CLI flags, ``config.yml`` ``with:`` keys and ``TokenStreamingExecutor(...)`` arguments never disagree.
"""

import argparse
import faulthandler
import inspect
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HELP = {
    "model_name": "Hugging Face hub name, local folder or GGUF file (dequantized once, cached); omit it to serve "
                  "the default model, SmolLM2-135M-Instruct",
    "device": "auto (accelerate places the model), cpu, cuda or cuda:N; a missing device is an error",
    "dtype": "auto (the checkpoint's own), float32, float16 or bfloat16",
    "quantize": "auto (default): int4 on a CPU for a GGUF file of Q4_0/Q4_1 blocks (the default model), the "
                "model as loaded elsewhere (the log says which and why); none: the model as loaded (float32 for a "
                "GGUF); int4: 4-bit Linear weights in groups of 32, as a GGUF keeps them (CPU only; README \"4-bit "
                "weights\"); int8: int8 Linear weights with per-token int8 activations (CPU only; perplexity within 3%%)",
    "trust_remote_code": "run code shipped with the model (off by default)",
    "allow_pickle": "allow .bin (pickle) weights; safetensors only by default",
    "max_new_tokens_limit": "largest max_new_tokens a client may ask for",
    "max_prompt_tokens": "largest prompt, in tokens after the chat template",
    "max_prompt_chars": "largest total message content, in characters (checked before tokenizing)",
    "max_batch_size": "requests decoded together in one forward pass",
    "max_queue": "prompts allowed to wait for a batch slot, over all calls; a call that would pass it gets a "
                 "'server busy' error",
    "max_prompts_per_call": "largest number of prompts in one /chat request (bigger calls are refused: send "
                            "them in smaller requests)",
    "prefill_chunk": "prompt tokens prefilled per scheduler round (bounds the stall a long prompt causes)",
    "request_timeout": "seconds a prompt may run from its first batch slot before it ends with "
                       "finish_reason=time_limit",
    "kv_cache_memory": "memory for keys and values: running rows first, the prefix cache in the rest. A size "
                       "(4GiB, 512MiB), a fraction of free memory (0.5), or auto (GPU: 60%% of free memory; CPU: "
                       "the rows twice over, at most 25%% of available memory)",
    "prefix_caching": "reuse the keys and values of prompt prefixes served before (--no-prefix-caching: off)",
    "speculate": "most draft tokens a row verifies per step (speculative decoding from the request's own n-grams; "
                 "drafts only where they pay, measured as it runs; greedy answers unchanged in float32, sampled ones "
                 "keep their distribution); 0: off",
    "stream_text": "delta: each /stream piece is new text; cumulative: the whole answer so far",
    "log_prompts": "log each request's messages and gen_conf (off: prompts are never logged)",
}


def executor_settings():
    """(name, default) of every TokenStreamingExecutor argument: the single source of setting names."""
    from executor import TokenStreamingExecutor

    parameters = inspect.signature(TokenStreamingExecutor.__init__).parameters.values()
    return [(p.name, p.default) for p in parameters if p.name not in ("self", "kwargs")]


PROTOCOLS = ("grpc", "http", "websocket")
# Executor arguments whose flags the parser defines itself (they also configure the gateway, or read the
# environment); openai_host comes from --host.
CLI_OWNED = {"openai_port", "openai_host", "api_key", "ssl_certfile", "ssl_keyfile"}
DEFAULT_IMAGE = "jina-llm-stream:latest"


def build_parser(settings) -> argparse.ArgumentParser:
    from executor.router import DEFAULT_MIGRATIONS, ROUTING_CHOICES

    parser = argparse.ArgumentParser(
        description="Serve a Hugging Face causal LM over Jina (/chat and /stream).",
        epilog="python jina_server.py export {kubernetes DIR | docker-compose FILE} [flags]: write manifests for "
               "the same settings instead of serving.")
    parser.add_argument("--port", type=int, nargs="+", default=[12345],
                        help="one port per protocol, in the same order (default 12345)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--protocol", nargs="+", default=["grpc"], choices=PROTOCOLS,
                        help="any of grpc http websocket (default grpc)")
    parser.add_argument("--replicas", type=int, default=1, help="copies of the model behind Jina's load balancing")
    parser.add_argument("--routing", choices=ROUTING_CHOICES, default="prefix",
                        help="with --replicas: send each request to the replica that was sent the longest prefix of "
                             "its messages, else the least loaded (prefix, the default), or to each replica in turn "
                             "(round_robin)")
    parser.add_argument("--migrations", type=migrations_count, default=DEFAULT_MIGRATIONS,
                        help="with --replicas: how often one stream whose replica dies mid-answer is continued on "
                             f"another replica (0: the client gets an error; default {DEFAULT_MIGRATIONS})")
    parser.add_argument("--monitoring", action="store_true", help="serve Prometheus metrics")
    parser.add_argument("--port-monitoring", "--port_monitoring", dest="port_monitoring", type=int, default=None,
                        help="port of the metrics endpoint (with --monitoring)")
    parser.add_argument("--gateway-port-monitoring", "--gateway_port_monitoring", dest="gateway_port_monitoring",
                        type=int, default=None,
                        help="with --monitoring: port of the gateway's metrics (routing and migration counters); "
                             "default: a free port, named in the log (a Flow's: --port-monitoring)")
    parser.add_argument("--ssl-certfile", "--ssl_certfile", dest="ssl_certfile", default=None,
                        help="TLS certificate (PEM) for gRPC, HTTP and WebSocket; needs --ssl-keyfile")
    parser.add_argument("--ssl-keyfile", "--ssl_keyfile", dest="ssl_keyfile", default=None,
                        help="TLS private key (PEM) matching --ssl-certfile")
    parser.add_argument("--openai-port", "--openai_port", dest="openai_port", type=int, default=None,
                        help="also serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                             "/v1/models) on this port, from every replica")
    parser.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get("JINA_LLM_STREAM_API_KEY"),
                        help="bearer token the OpenAI API requires (default: $JINA_LLM_STREAM_API_KEY; none)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"container image for export (default {DEFAULT_IMAGE})")
    for name, default in settings:
        if name in CLI_OWNED:
            continue
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        if isinstance(default, bool):
            action = argparse.BooleanOptionalAction if default else "store_true"  # on by default: --no-NAME
            parser.add_argument(*flags, dest=name, action=action, default=default, help=HELP.get(name))
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(*flags, dest=name, type=kind, default=default,
                                help=f"{HELP.get(name, '')} (default {default})")
    return parser


def migrations_count(text: str) -> int:
    if not text.isdigit() or int(text) > 16:
        raise argparse.ArgumentTypeError(f"migrations={text!r} is not allowed: use 0 (off) to 16")
    return int(text)


# Kubernetes' default grace is 30 s; a stop that takes longer is a hang, not a slow teardown (3-6 s here).
STOP_GRACE_S = 20


def _stop_like_ctrl_c(*_):
    """SIGTERM (docker stop, Kubernetes) shuts down the same clean way as Ctrl-C, within STOP_GRACE_S."""
    bound_the_stop()
    raise KeyboardInterrupt


_stop_bounded = threading.Event()


def bound_the_stop(grace_s: float = STOP_GRACE_S) -> None:
    """Jina joins its processes with no timeout, so one stuck in its teardown would hold the stop forever.
    Past the grace, each process still alive dumps its threads' stacks into the log (executor/__init__.py
    registers SIGUSR1 for it: the cause stays findable) and is killed."""
    if _stop_bounded.is_set():
        return
    _stop_bounded.set()
    threading.Thread(target=_stop_within, args=(grace_s,), name="stop-bound", daemon=True).start()


def _stop_within(grace_s: float) -> None:
    _kill_stragglers(grace_s)
    _end_the_main_process()


# Once every child process is down, the main process's own teardown (Jina closing its channels) takes well under
# a second; after a process-group SIGINT it was seen to hang there (CI, 2026-12-07: no child left, no exit).
MAIN_TEARDOWN_S = 5


def _kill_stragglers(grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.2)
    stragglers = multiprocessing.active_children()
    for process in stragglers:
        logging.getLogger("jina_llm_stream").warning(
            "process %s (pid %d) did not stop within %.0f s of the stop signal: its threads' stacks follow, "
            "then it is killed", process.name, process.pid, grace_s)
        _signal(process.pid, signal.SIGUSR1)
    time.sleep(1 if stragglers else 0)
    for process in stragglers:
        _signal(process.pid, signal.SIGKILL)


def _end_the_main_process() -> None:
    time.sleep(MAIN_TEARDOWN_S)
    logging.getLogger("jina_llm_stream").warning(
        "the main process did not end within %d s of its processes stopping: its threads' stacks follow, then it "
        "exits", MAIN_TEARDOWN_S)
    faulthandler.dump_traceback(all_threads=True)
    os._exit(0)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def tls_kwargs(args) -> dict:
    """Both files or neither, and readable now: a typo must stop the start, not serve in plain text."""
    given = {name: getattr(args, name) for name in ("ssl_certfile", "ssl_keyfile") if getattr(args, name)}
    if len(given) == 1:
        raise SystemExit("TLS needs both --ssl-certfile and --ssl-keyfile; only "
                         f"--{next(iter(given)).replace('_', '-')} was given")
    for name, path in given.items():
        if not os.access(path, os.R_OK):
            raise SystemExit(f"--{name.replace('_', '-')}={path}: no such readable file")
    return given


def deployment_kwargs(args, settings, uses) -> dict:
    if len(args.port) != len(args.protocol):
        raise SystemExit(f"--port needs one port per protocol: {len(args.protocol)} protocol(s) "
                         f"({' '.join(args.protocol)}) but {len(args.port)} port(s) ({' '.join(map(str, args.port))})")
    uses_with = {name: getattr(args, name) for name, _ in settings if name != "openai_host"} | {"openai_host": args.host}
    kwargs = dict(uses=uses, uses_with=uses_with,
                  port=args.port if len(args.port) > 1 else args.port[0],
                  protocol=args.protocol if len(args.protocol) > 1 else args.protocol[0],
                  host=args.host, replicas=args.replicas)
    if args.monitoring:
        kwargs.update(monitoring=True, port_monitoring=args.port_monitoring)
    return kwargs | tls_kwargs(args)


def serve(args, settings) -> int:
    from jina import Deployment, Flow

    from executor import TokenStreamingExecutor
    from executor.gguf_model import is_gguf
    from executor.router import MIGRATIONS_ENV, ROUTING_ENV

    kwargs = deployment_kwargs(args, settings, TokenStreamingExecutor)
    os.environ[ROUTING_ENV] = args.routing  # read by the gateway's process (executor/jina_compat.py)
    os.environ[MIGRATIONS_ENV] = str(args.migrations)  # likewise, and by the OpenAI router
    share_the_cores(args.replicas)
    # Bounds how long a stop waits for each process's "I am down" signal (Jina's default: 60 s), which
    # it can miss when Ctrl-C reaches the whole process group at once. Local readiness pings need far less.
    kwargs["timeout_ctrl"] = 5
    if "websocket" in args.protocol or "ssl_certfile" in kwargs:
        # Jina's Deployments refuse websocket, and give TLS to the Executor behind their gateway as well
        # (which the gateway then cannot reach): a one-Executor Flow puts both on its gateway only.
        gateway = {k: kwargs.pop(k) for k in ("port", "protocol", "host")} | {"timeout_ctrl": 5}
        tls = {k: kwargs.pop(k) for k in ("ssl_certfile", "ssl_keyfile") if k in kwargs}
        if args.monitoring:
            port_monitoring = kwargs.pop("port_monitoring")
            gateway.update(monitoring=True, port_monitoring=args.gateway_port_monitoring or port_monitoring)
            kwargs.pop("monitoring")
        # TLS through config_gateway: Flow(...) arguments also reach the Executor, which would then speak
        # TLS to the gateway as well.
        server = Flow(**gateway).config_gateway(**tls).add(name="llm", **kwargs)
    else:
        server = Deployment(**kwargs)
        if args.monitoring:
            monitor_the_gateway(server, args.gateway_port_monitoring)
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    signal.signal(signal.SIGINT, _stop_like_ctrl_c)
    if not args.model_name or is_gguf(args.model_name):
        # Dequantized on first use (tens of seconds), before the gateway starts polling an Executor that is
        # still busy (a warning a second) and before replicas would each do it; the Executors then find the copy
        # on disk. In a child process: an Executor that Jina forks from a process with torch's thread pool
        # started hangs at its first parallel operation.
        try:
            gguf_file = str(Path(args.model_name).expanduser().resolve()) if args.model_name else ""
            subprocess.run([sys.executable, "-m", "executor.gguf_model", gguf_file],
                           cwd=Path(__file__).resolve().parent, check=True)
        except KeyboardInterrupt:
            return 0
        except subprocess.CalledProcessError as error:
            logging.getLogger("jina_llm_stream").error("the model could not be prepared (exit code %d)",
                                                       error.returncode)
            return 1
    router = openai_router(args)
    try:
        with server:
            if router is not None:
                router.start()
            server.block()
    except KeyboardInterrupt:
        return 0
    except Exception as error:  # noqa: BLE001 - e.g. the model could not be loaded: say so and exit non-zero
        reason = str(error) or f"{type(error).__name__} (the reason is logged above)"
        logging.getLogger("jina_llm_stream").error("the server could not start: %s", reason)
        return 1
    return 0


def monitor_the_gateway(deployment, port) -> None:
    """A Deployment's --monitoring covers its replicas only; the routing and migration counters live in its
    gateway's process (executor/jina_compat.py), so the gateway serves metrics too, on ``port`` or a free one."""
    gateway_args = deployment.pod_args["gateway"]
    if gateway_args is None:
        return
    gateway_args.monitoring, gateway_args.port_monitoring = True, port or free_loopback_ports(1)[0]
    logging.getLogger("jina_llm_stream").info("gateway metrics (routing, migrations) on port %d",
                                              gateway_args.port_monitoring)


def share_the_cores(replicas: int) -> None:
    """Several replicas on this machine: each computes on its share of the cores (executor.py's
    share_the_cpu), unless the user chose the threads (OMP_NUM_THREADS, or the variable itself)."""
    from executor.executor import CPU_THREADS_ENV

    if replicas > 1 and CPU_THREADS_ENV not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ[CPU_THREADS_ENV] = str(max(1, len(os.sched_getaffinity(0)) // replicas))


def openai_router(args):
    """With several replicas and prefix routing, the OpenAI port is a router's (executor/gateway.py), and each
    replica serves its API on a loopback port of its own; otherwise the replicas share the port itself."""
    if args.openai_port is None or args.replicas < 2 or args.routing != "prefix":
        return None
    from executor.gateway import OpenAIRouter
    from executor.openai_api import OPENAI_REPLICA_PORTS_ENV

    ports = free_loopback_ports(args.replicas)
    os.environ[OPENAI_REPLICA_PORTS_ENV] = ",".join(map(str, ports))  # read by each replica (forked after this)
    return OpenAIRouter(args.host, args.openai_port, [f"http://127.0.0.1:{port}" for port in ports],
                        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, monitoring=args.monitoring)


def free_loopback_ports(count: int) -> list:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def export(kind: str, target: str, args, settings) -> int:
    """Kubernetes or docker-compose manifests from Jina's own exporters, offline, rewritten to run the project's
    image for the gateway too (executor/export.py)."""
    from jina import Flow

    # Without these, Jina resolves its gateway image and `uses` through its hub over the network.
    os.environ["JINA_GATEWAY_IMAGE"] = args.image
    kwargs = deployment_kwargs(args, settings, f"docker://{args.image}")
    # The API key is not written into manifests: the worker reads JINA_LLM_STREAM_API_KEY (e.g. from a Secret).
    kwargs["uses_with"] = {k: v for k, v in kwargs["uses_with"].items() if v is not None and k != "api_key"}
    kwargs["uses_with"]["openai_host"] = "0.0.0.0"
    # A Flow, not a Deployment: its gateway carries the client-facing ports and protocols.
    gateway = {k: kwargs.pop(k) for k in ("port", "protocol")}
    tls = {k: kwargs.pop(k) for k in ("ssl_certfile", "ssl_keyfile") if k in kwargs}
    kwargs.pop("host")
    if kwargs.pop("monitoring", False):
        gateway["monitoring"] = kwargs["monitoring"] = True
    flow = Flow(**gateway).config_gateway(**tls).add(name="llm", **kwargs)
    from executor.export import rewrite_docker_compose, rewrite_kubernetes

    if kind == "kubernetes":
        flow.to_kubernetes_yaml(target, k8s_namespace="jina-llm-stream")
        rewrite_kubernetes(target, args.image, args.openai_port, args.routing, args.migrations)
    else:
        flow.to_docker_compose_yaml(target)
        rewrite_docker_compose(target, args.image, args.openai_port, args.routing, args.migrations)
    print(f"wrote {kind} manifests to {target}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = executor_settings()
    parser = build_parser(settings)
    if argv[:1] == ["export"]:
        if len(argv) < 3 or argv[1] not in ("kubernetes", "docker-compose"):
            parser.error("usage: jina_server.py export {kubernetes DIR | docker-compose FILE} [flags]")
        return export(argv[1], argv[2], checked(parser, argv[3:]), settings)
    return serve(checked(parser, argv), settings)


def checked(parser, argv):
    """Parsed flags; a value the Executor would refuse is refused here, before any model loads."""
    from executor.kv_cache import parse_memory_size
    from executor.quantize import check_quantize
    from executor.speculation import check_speculate

    args = parser.parse_args(argv)
    try:
        parse_memory_size(args.kv_cache_memory)
        check_speculate(args.speculate)
        check_quantize(args.quantize, "cuda" if args.device.startswith("cuda") else None)
    except ValueError as error:
        parser.error(str(error))
    return args


if __name__ == "__main__":
    sys.exit(main())
