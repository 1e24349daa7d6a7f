"""Command line: serve a Hugging Face causal LM with Jina.

    python jina_server.py                        # the built-in demo model on port 12345 (gRPC)
    python jina_server.py --model_name gpt2      # any hub name or local folder

Every Executor argument is a flag of the same name (``--max_batch_size`` or ``--max-batch-size``), so
CLI flags, ``config.yml`` ``with:`` keys and ``TokenStreamingExecutor(...)`` arguments never disagree.
"""

import argparse
import inspect
import logging
import signal
import sys

HELP = {
    "model_name": "Hugging Face hub name or local folder; omit it to serve the built-in demo model",
    "device": "auto (accelerate places the model), cpu, cuda or cuda:N; a missing device is an error",
    "dtype": "auto (the checkpoint's own), float32, float16 or bfloat16",
    "trust_remote_code": "run code shipped with the model (off by default)",
    "allow_pickle": "allow .bin (pickle) weights; safetensors only by default",
    "max_new_tokens_limit": "largest max_new_tokens a client may ask for",
    "max_prompt_tokens": "largest prompt, in tokens after the chat template",
    "max_prompt_chars": "largest total message content, in characters (checked before tokenizing)",
    "max_batch_size": "requests decoded together in one forward pass",
    "max_queue": "requests allowed to wait for a batch slot; more get a 'server busy' error",
    "prefill_chunk": "prompt tokens prefilled per scheduler round (bounds the stall a long prompt causes)",
    "request_timeout": "seconds a request may run before it ends with finish_reason=time_limit",
    "stream_text": "delta: each /stream piece is new text; cumulative: the whole answer so far",
}


def executor_settings():
    """(name, default) of every TokenStreamingExecutor argument: the single source of setting names."""
    from executor import TokenStreamingExecutor

    parameters = inspect.signature(TokenStreamingExecutor.__init__).parameters.values()
    return [(p.name, p.default) for p in parameters if p.name not in ("self", "kwargs")]


def build_parser(settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve a Hugging Face causal LM over Jina (/chat and /stream).")
    parser.add_argument("--port", type=int, default=12345, help="port of the gateway (default 12345)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--protocol", default="grpc", choices=["grpc"], help="wire protocol (default grpc)")
    for name, default in settings:
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        if isinstance(default, bool):
            parser.add_argument(*flags, dest=name, action="store_true", default=default, help=HELP.get(name))
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(*flags, dest=name, type=kind, default=default,
                                help=f"{HELP.get(name, '')} (default {default})")
    return parser


def _stop_like_ctrl_c(*_):
    """SIGTERM (docker stop, Kubernetes) shuts down the same clean way as Ctrl-C."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    settings = executor_settings()
    args = build_parser(settings).parse_args(argv)
    uses_with = {name: getattr(args, name) for name, _ in settings}

    from jina import Deployment

    from executor import TokenStreamingExecutor

    deployment = Deployment(uses=TokenStreamingExecutor, uses_with=uses_with, port=args.port,
                            protocol=args.protocol, host=args.host)
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    try:
        with deployment:
            deployment.block()
    except KeyboardInterrupt:
        return 0
    except Exception as error:  # noqa: BLE001 - e.g. the model could not be loaded: say so and exit non-zero
        reason = str(error) or f"{type(error).__name__} (the reason is logged above)"
        logging.getLogger("jina_llm_stream").error("the server could not start: %s", reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
