"""The CLI, the default model, config.yml (Deployment and `jina executor`), start-up failures."""

import json
import os
import signal
import subprocess
import time

import httpx
from docarray import DocList

from conftest import (PYTHON, REPEATED_PROMPT, ROOT, free_port, post_chat, run, serve_deployment, serve_process,
                      stream_doc)
from schemas import Prompt

def run_cli(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``jina_server.py FLAGS`` run to its end in a process group of its own: on a timeout the whole group is
    killed (``subprocess.run`` would kill the server's process alone and leave any worker it had started)."""
    with subprocess.Popen([PYTHON, "jina_server.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


HELLO = Prompt(message=[{"role": "user", "content": "Hello!"}], gen_conf={"max_new_tokens": 12})


def test_cli_serves_the_default_model_and_stops_on_sigterm(tmp_path):
    """With no --model_name: SmolLM2-135M-Instruct, dequantized from the wheel's GGUF file on this first start
    (an empty cache folder) and kept there. Also two flags that are off by default: --log-prompts, and --no-prefix-caching: the same long prompt
    twice reuses nothing. (With caching on, its second time is a hit: test_protocols.py's
    test_cached_prompt_tokens_counter_grows_by_each_answers_cached_tokens sends it until it hits.)"""
    port = free_port()
    env = {"JINA_LLM_STREAM_CACHE": str(tmp_path / "cache")}
    with serve_process([PYTHON, "jina_server.py", "--port", str(port), "--log-prompts", "--no-prefix-caching"],
                       env=env, timeout=300) as (process, log):  # the first start dequantizes the model
        assert process.poll() is None, log.read_text()
        repeated = [run(post_chat(port, Prompt(**REPEATED_PROMPT)))[0] for _ in range(2)]
        assert [(a.prompt_tokens > 64, a.cached_tokens) for a in repeated] == [(True, 0), (True, 0)], repeated
        question = Prompt(message=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                          gen_conf={"max_new_tokens": 24})
        answer = run(post_chat(port, question))[0]
        pieces = run(stream_doc(port, question))
        assert "Paris" in answer.text and "".join(p.text for p in pieces) == answer.text
        tell = [{"role": "user", "content": "Tell me about Paris in two sentences."}]
        sampled = run(post_chat(port, Prompt(message=tell, gen_conf={"max_new_tokens": 60, "do_sample": True,
                                                                      "temperature": 0.8, "seed": 1})))[0]
        for text in (answer.text, sampled.text):
            assert_reads_as_words(text)
        assert "serving the default model SmolLM2-135M-Instruct" in log.read_text()
        assert "dequantizing" in log.read_text() and "dequantized SmolLM2-135M-Instruct.Q4_1.gguf in" in log.read_text()
        assert "prompt messages=[{'role': 'user', 'content': 'Tell me about Paris in two sentences.'}]" in log.read_text()
        [copy] = (tmp_path / "cache" / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*")
        assert (copy / ".complete").exists() and (copy / "model.safetensors").exists()
        started = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("still running 30 s after SIGTERM:\n" + log.read_text()[-6000:]) from None
        # Within jina_server.STOP_GRACE_S (+1 s to kill), or it would have logged "did not stop within ..."
        # with the stacks of the process that held it.
        assert time.monotonic() - started < 30, log.read_text()[-6000:]


def assert_reads_as_words(text: str) -> None:
    """English-like: valid characters only, mostly letters and spaces, several words."""
    assert "\ufffd" not in text, text
    plain = sum(c.isascii() and (c.isalpha() or c.isspace() or c in ".,;:!?'-") for c in text)
    assert plain >= 0.9 * len(text), text
    assert len([word for word in text.split() if word.strip(".,;:!?'-").isalpha()]) >= 3, text


def test_importing_jina_prints_no_warning():
    """Every client script imports jina: it must not greet the user with a setuptools warning."""
    result = subprocess.run([PYTHON, "-c", "import jina; from jina import Client, Deployment"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_cli_accepts_every_setting_under_its_one_name():
    help_text = run_cli("--help").stdout
    for name in ("model_name", "device", "dtype", "max_new_tokens_limit", "max_prompt_tokens", "max_batch_size",
                 "max_queue", "request_timeout", "trust_remote_code", "allow_pickle", "stream_text", "kv_cache_memory",
                 "prefix_caching", "speculate", "quantize"):
        assert f"--{name}" in help_text
        assert f"--{name}" in help_text and name + ":" in (ROOT / "config.yml").read_text()
    assert "--port" in help_text and "--host" in help_text
    assert "--no-prefix-caching" in help_text


def test_a_bad_kv_cache_memory_is_refused_before_the_model_loads():
    result = run_cli("--kv-cache-memory", "4XB")
    assert result.returncode == 2
    assert "kv_cache_memory='4XB' is not a size" in result.stderr and "4GiB" in result.stderr


def test_a_speculate_out_of_range_is_refused_before_the_model_loads():
    result = run_cli("--speculate", "99")
    assert result.returncode == 2
    assert "speculate=99 is not allowed: use 0 (off) to 32 draft tokens per step" in result.stderr


def test_a_bad_quantize_and_int8_on_cuda_are_refused_before_the_model_loads():
    for flags, message in ((["--quantize", "int3"], "quantize='int3' is not allowed: use one of auto, none, int8, int4"),
                           (["--quantize", "int8", "--device", "cuda"], "quantize=int8 is for CPUs"),
                           (["--quantize", "int4", "--device", "cuda"], "quantize=int4 is for CPUs")):
        result = run_cli(*flags)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_model_that_cannot_be_loaded_stops_start_up_with_a_clear_error(tmp_path):
    port = free_port()
    missing = tmp_path / "no-such-model"
    with serve_process([PYTHON, "jina_server.py", "--port", str(port), "--model_name", str(missing)],
                       ready_line="could not start") as (process, log):
        code = process.wait(timeout=120)
        output = log.read_text()
    assert code != 0
    assert "could not load model" in output and str(missing) in output


def test_config_yml_with_a_model_without_chat_template(tiny_models):
    from executor.model import encode_prompt
    from transformers import AutoTokenizer

    port = free_port()
    with serve_deployment(port, str(ROOT / "config.yml"), json.dumps({"model_name": str(tiny_models["plain"])})):
        answer = run(post_chat(port, HELLO))[0]
        pieces = run(stream_doc(port, HELLO))
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["plain"])
    assert tokenizer.chat_template is None
    assert answer.prompt_tokens == len(encode_prompt(tokenizer, HELLO.message))  # the fallback template
    assert answer.text and "".join(p.text for p in pieces) == answer.text


def test_jina_executor_cli_with_config_yml(tiny_models):
    port, openai_port = free_port(), free_port()
    uses_with = json.dumps({"model_name": str(tiny_models["plain"]), "openai_port": openai_port})
    command = [os.path.join(os.path.dirname(PYTHON), "jina"), "executor", "--uses", "config.yml", "--port", str(port),
               "--uses-with", uses_with]
    with serve_process(command, ready_line="start server bound to") as (process, log):
        assert process.poll() is None, log.read_text()
        answers = run(post_chat(port, DocList[Prompt]([HELLO, HELLO])))
        pieces = run(stream_doc(port, HELLO))
        # The worker alone serves the OpenAI API too: it lives next to the engine, not in a gateway.
        body = {"model": str(tiny_models["plain"]), "prompt": "Hello", "max_tokens": 4}
        completion = httpx.post(f"http://127.0.0.1:{openai_port}/v1/completions", json=body, timeout=60)
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] >= 1, completion.text
    assert len(answers) == 2 and answers[0].text == answers[1].text == "".join(p.text for p in pieces)
