"""make mutants: remove one protection at a time and check that its tests fail (a test that still passes
without the protection proves nothing). Every file is restored after each run.

    .venv/bin/python tests/mutants/run.py            # all of them
    .venv/bin/python tests/mutants/run.py prefix     # those whose name contains "prefix"
"""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
MUTANTS = [
    ("content size bound", "executor/validation.py", "if total_chars > limits.max_prompt_chars:", "if False:", "tests/unit/test_validation.py"),
    ("role allow-list", "executor/validation.py", "if role not in ALLOWED_ROLES:", "if False:", "tests/unit/test_validation.py"),
    ("beam/num_return_sequences cap", "executor/validation.py", '"num_beams": (int, 1, 1, None),', '"num_beams": (int, 1, 64, None),', "tests/unit/test_validation.py"),
    ("template output bound", "executor/model.py", "if max_chars is not None and len(text) > max_chars:", "if False:", "tests/unit/test_engine.py -k bounded"),
    ("safetensors only", "executor/model.py", "use_safetensors=None if allow_pickle else True,", "use_safetensors=None,", "tests/unit/test_model_loading.py"),
    ("max_new_tokens limit", "executor/validation.py", "high = limits.max_new_tokens_limit", "high = None", "tests/unit/test_validation.py"),
    ("queue bound", "executor/scheduler.py", "if not self.waiting.fits(len(call.sequences)):", "if False:", "tests/unit/test_engine.py -k 'busy or refused_whole'"),
    ("cancelled call leaves the queue at once", "executor/scheduler.py", "            removed = self.waiting.remove_waiting(lambda s: s.cancelled)\n", "            removed = []\n", "tests/unit/test_engine.py -k leaves_the_queue"),
    ("per-call prompt bound", "executor/executor.py", "if len(docs) > self.max_prompts_per_call:", "if False:", "tests/e2e/test_batch_jobs.py -k per_call"),
    ("a call without rows preempts", "executor/scheduler.py", "return richest if richest.active >= 2 else None", "return None", "tests/unit/test_engine.py -k preempts"),
    ("TLS flags", "jina_server.py", "return kwargs | tls_kwargs(args)", "return kwargs", "tests/e2e/test_tls.py -k https"),
    ("no replay of a broken stream", "executor/jina_compat.py", "            if answered:  # Jina would retry", "            if False:  # Jina would retry", "tests/e2e/test_faults.py -k dead"),
    ("gateway cancels the /chat call of a client that left", "executor/jina_compat.py", "                for call in calls:\n                    call.cancel()", "                pass", "tests/e2e/test_load.py -k goes_away"),
    ("HTTP balancer passes a client's leaving on", "executor/jina_compat.py", "web.AppRunner(self.app, handler_cancellation=True)", "web.AppRunner(self.app)", "tests/e2e/test_load.py -k before_its_chat"),
    ("HTTP POST cancelled when its client left", "executor/jina_compat.py", "                answer.cancel()\n", "", "tests/e2e/test_load.py -k before_its_chat"),
    ("prompts kept out of the log", "executor/executor.py", "if self.log_prompts:", "if True:", "tests/e2e/test_protocols.py -k without_prompt_text"),
    ("Flow gateway keeps Prompt.message", "executor/jina_compat.py", "        _use_wire_classes(streamer._endpoints_models_map)\n", "", "tests/e2e/test_websocket.py -k plain_http_post"),
    ("prefix blocks found only behind their parent", "executor/kv_cache.py", "limit // self.block_size):\n            node = node.children.get(block_tokens)\n", "limit // self.block_size):\n            node = self._root.children.get(block_tokens)\n", "tests/unit/test_kv_cache.py -k prefix"),
    ("a hit leaves the last prompt token to compute", "executor/kv_manager.py", "out of the batch's way\n        path = self.prefix.match(context, len(context) - 1)", "out of the batch's way\n        path = self.prefix.match(context, len(context))", "tests/unit/test_prefix_caching.py -k whole_cached_blocks"),
    ("eviction spares the path being extended", "executor/kv_cache.py", "self._allocate(protect=on_path | {node})", "self._allocate(protect=set())", "tests/unit/test_kv_cache.py -k evict"),
    ("a shared block being computed is waited for", "executor/scheduler.py", "            if kv.waits_for_a_shared_block(sequence, context, claimed):\n                continue\n", "", "tests/unit/test_prefix_caching.py -k once"),
    ("admission bounds the rows by the pool's tokens", "executor/kv_cache.py", "max(self.owned_rows(), row + 1) * need <= self.pool.batch_room() - pinning * self.pool.block_size", "True", "tests/unit/test_prefix_caching.py -k burst"),
    ("sliding windows through the mask (all layers kept)", "executor/model_runner.py", "        cache = DynamicCache()\n        logits = self._prefill_logits(input_ids, mask, positions, cache)", "        cache = DynamicCache(config=self.model.config)\n        logits = self._prefill_logits(input_ids, mask, positions, cache)", "tests/unit/test_architectures.py -k 'mistral or gemma'"),
    ("response_format masks each step", "executor/sampling.py", "            grammar.mask(scores[0])\n", "            pass\n", "tests/unit/test_grammar.py"),
    ("response_format nesting bound", "executor/grammar.py", "if deepest > MAX_NESTING:", "if False:", "tests/unit/test_grammar.py -k too_large"),
    ("tool_choice required constrains the answer", "executor/validation.py", "    if parsed is not None and parsed.constrained:", "    if False:", "tests/unit/test_tools.py -k required"),
    ("stream cancellation on disconnect (OpenAI)", "executor/jina_compat.py", "                answer.cancel()\n", "", "tests/e2e/test_openai.py -k full_queue"),
    ("cached prompt tokens counter counts the cached ones", "executor/metrics.py", "self.cached.inc(cached_tokens)", "self.cached.inc(prompt_tokens)", "tests/e2e/test_protocols.py -k cached_prompt_tokens_counter"),
    ("--no-prefix-caching reaches the engine", "executor/executor.py", "prefix_caching=prefix_caching,", "prefix_caching=True,", "tests/e2e/test_cli.py -k default_model"),
    ("n choices count their prompt once (OpenAI usage)", "executor/openai_api.py", "prompt += came[0].prompt_tokens or 0", "prompt += sum(last.prompt_tokens or 0 for last in came)", "tests/e2e/test_openai.py -k n_choices"),
    ("n choices report choice 0's cached tokens", "executor/openai_api.py", "cached += getattr(came[0], \"cached_tokens\", 0) or 0", "cached += max(getattr(last, \"cached_tokens\", 0) or 0 for last in came)", "tests/e2e/test_openai.py -k n_choices"),
    ("streamed usage groups the n choices", "executor/openai_api.py", "usage=_usage(lasts, n)", "usage=_usage(lasts, 1)", "tests/e2e/test_openai.py -k n_choices"),
    ("a leaving row remembers its held tokens, not its span with holes", "executor/kv_manager.py", "sequence, length = running[index], self.batch.held(index)", "sequence, length = running[index], self.batch.lengths[index]", "tests/unit/test_speculation.py"),
    ("admission counts newly pinned blocks", "executor/kv_manager.py", "self.prefix.unpinned(path) if path else 0)", "0)", "tests/unit/test_kv_manager.py -k admission"),
    ("admission leaves room for the answer's first tokens", "executor/kv_manager.py", "ANSWER_MARGIN = 64", "ANSWER_MARGIN = 0", "tests/unit/test_kv_manager.py -k admission"),
    ("verify padding stays inside the learned positions", "executor/model_runner.py", "positions = positions.clamp_(max=self._last_position)", "positions = positions", "tests/unit/test_speculation.py -k learned_position"),
    ("a failed step ends only the unfinished rows", "executor/engine.py", "unfinished = [sequence for sequence in self.runner.running if not sequence.finished]", "unfinished = list(self.runner.running)", "tests/unit/test_engine.py -k fails_after_some"),
    ("int8 refuses a grid whose pairs pass 16 bits", "executor/quantize.py", "if widest > PAIR_SUM_LIMIT:", "if False:", "tests/unit/test_quantize.py -k grids"),
    ("half-precision merge in float32", "executor/attention.py", "        out = out.float()\n", "", "tests/unit/test_precision.py -k bfloat16"),
    ("a request no row can hold is refused, not left waiting", "executor/engine.py", "        if self._tokens_needed(sequence) > self.max_context:\n            return True\n", "", "tests/unit/test_precision.py -k no_row_can_hold"),
    ("whole-answer stream usage groups the n choices", "executor/openai_api.py", "usage=_usage(answers, n)", "usage=_usage(answers, 1)", "tests/unit/test_openai_mapping.py -k n_choices"),
]
missed = 0
chosen = [m for m in MUTANTS if not sys.argv[1:] or any(word in m[0] for word in sys.argv[1:])]
for name, path, old, new, tests in chosen:
    file = ROOT / path
    original = file.read_text()
    assert original.count(old) == 1, (name, original.count(old))
    mutated = original.replace(old, new)
    if path.endswith(".py"):
        try:  # a mutant that does not compile would be "caught" by any test: it proves nothing
            compile(mutated, path, "exec")
        except SyntaxError as error:
            print(f"INVALID {name}: {error}", flush=True)
            missed += 1
            continue
    file.write_text(mutated)
    try:
        result = subprocess.run(f"{sys.executable} -m pytest -q -x {tests}", shell=True, cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
    finally:
        file.write_text(original)
    last = [l for l in result.stdout.splitlines() if l.strip()][-1:]
    missed += result.returncode == 0
    print(f"{'CAUGHT' if result.returncode else 'MISSED'}  {name}: {last}", flush=True)
sys.exit(1 if missed else 0)
