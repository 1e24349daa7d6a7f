"""Speculation's promise per precision, measured: the default model's greedy answers with --speculate 8 against
--speculate 0, in one engine each, the same prompts at once (RAG answers that quote a passage, and free text).

    .venv/bin/python bench/speculation_agreement.py [float32 bfloat16 int4 int8 float16]

fp32 answers are identical by construction (a verify step computes each position as a plain step does, up to
float32 rounding that never moved a greedy token in the tests); in half precision and int8 a verify step adds in
another order (and int8 quantizes each step's rows on the batch's grid), so a near tie can go the other way."""

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor.engine import Engine, EngineConfig  # noqa: E402
from executor.model import encode_prompt, load  # noqa: E402
from executor.validation import Limits, fit_to_context, parse_gen_conf  # noqa: E402

PASSAGE = ("The Zorblat river rises in the Krell hills and flows north through the town of Quentaville, where it "
           "is crossed by the old Amber bridge, before it reaches the sea at Port Mallow.")
RAG = ["Where does the Zorblat river rise?", "Which bridge crosses the Zorblat river?", "Quote the passage.",
       "Where does the Zorblat reach the sea?"]
FREE = ["Write a short story about a cat.", "What is the capital of France?", "Explain photosynthesis briefly.",
        "List three uses of copper."]


def prompts(tokenizer) -> list:
    rag = [encode_prompt(tokenizer, [{"role": "system", "content": "Use this passage.\n\nPassage: " + PASSAGE},
                                     {"role": "user", "content": q}]) for q in RAG]
    return rag + [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in FREE]


def answers(lm, speculate: int, prompt_ids: list) -> list:
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(speculate=speculate)).start()
    limits = Limits(context_length=engine.max_context)

    async def one(ids):
        settings = fit_to_context(parse_gen_conf({"max_new_tokens": 48}, limits), len(ids), limits)
        return "".join([e.text async for e in engine.stream(ids, settings)])

    async def everyone():
        return await asyncio.gather(*(one(ids) for ids in prompt_ids))

    try:
        return asyncio.run(everyone())
    finally:
        engine.shutdown()


def main(precisions: list) -> None:
    for precision in precisions:
        started = time.monotonic()
        lm = load(None, device="cpu", quantize=precision) if precision.startswith("int") else \
            load(None, device="cpu", dtype=precision, quantize="none")
        prompt_ids = prompts(lm.tokenizer)
        plain, speculated = answers(lm, 0, prompt_ids), answers(lm, 8, prompt_ids)
        same = [a == b for a, b in zip(plain, speculated)]
        print(f"{precision}: {sum(same)} of {len(same)} identical (RAG {sum(same[:len(RAG)])}/{len(RAG)}, free text "
              f"{sum(same[len(RAG):])}/{len(FREE)}) in {time.monotonic() - started:.0f} s", flush=True)
        for a, b, equal in zip(plain, speculated, same):
            if not equal:
                print(f"    --speculate 0: {a[:90]!r}\n    --speculate 8: {b[:90]!r}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["float32", "bfloat16", "int4", "int8"])
