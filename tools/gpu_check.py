"""make gpu-check: the engine's guarantees on a CUDA GPU, in bfloat16, in a few minutes (bounded: 8).

Checks, each one line PASS/FAIL with its numbers: the default model in bf16 answers the capital question and a
passage question; prefix-cache hits are read in place (the copied-bytes counter for hits stays 0) by rows sharing
a passage; speculation's greedy answers against --speculate 0 (agreement counted: bf16 is not batch-invariant);
a split device map (some layers on the GPU, the rest on the CPU: accelerate's max_memory) serves the same
prompts; the engine's one-stream and 16-stream decode rates against model.generate. Without a GPU it says so
and exits 0 (a dry run: imports work), so it is safe in any CI.

    .venv/bin/python tools/gpu_check.py            # what make gpu-check runs
    GPU_CHECK_DEVICE=cpu .venv/bin/python tools/gpu_check.py   # the same checks on the CPU (no split map)
"""

import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from executor.engine import Engine, EngineConfig  # noqa: E402
from executor.model import encode_prompt, load  # noqa: E402
from executor.validation import Limits, fit_to_context, parse_gen_conf  # noqa: E402

DEADLINE = time.monotonic() + 8 * 60
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
PASSAGE = ("The Zorblat river rises in the Krell hills and flows north through the town of Quentaville, where it "
           "is crossed by the old Amber bridge, before it reaches the sea at Port Mallow. ") * 3
QUESTIONS = ["Where does the Zorblat river rise?", "Which bridge crosses the Zorblat?",
             "Where does the Zorblat reach the sea?", "Which town does the Zorblat flow through?"]
failures = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def rag(tokenizer, question: str) -> list:
    return encode_prompt(tokenizer, [{"role": "system", "content": "Answer from this passage.\n\n" + PASSAGE},
                                     {"role": "user", "content": question}])


def answers(engine, tokenizer, prompts: list, new_tokens: int = 40, exact_length: bool = False) -> list:
    limits = Limits(context_length=engine.max_context)
    conf = {"max_new_tokens": new_tokens, **({"min_new_tokens": new_tokens} if exact_length else {})}

    async def one(ids):
        settings = fit_to_context(parse_gen_conf(conf, limits), len(ids), limits)
        return "".join([event.text async for event in engine.stream(ids, settings)])

    async def everyone():
        return await asyncio.gather(*(one(ids) for ids in prompts))

    return asyncio.run(everyone())


def engine_for(lm, **config) -> Engine:
    return Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(**config)).start()


def check_answers_and_hits(lm) -> list:
    capital = encode_prompt(lm.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    engine = engine_for(lm, speculate=0)
    try:
        report("hits by reference", engine.kv.sharing, f"sharing={engine.kv.sharing}")
        first = answers(engine, lm.tokenizer, [capital, rag(lm.tokenizer, QUESTIONS[0])])
        report("capital question (bf16)", "Paris" in first[0], repr(first[0][:80]))
        report("passage question (bf16)", "Krell" in first[1], repr(first[1][:80]))
        plain = answers(engine, lm.tokenizer, [rag(lm.tokenizer, q) for q in QUESTIONS])
        copied = engine.kv.batch.copied_bytes["hit"]
        report("hits read in place", copied == 0, f"copied hit bytes {copied}")
    finally:
        engine.shutdown()
    return plain


def check_speculation(lm, plain: list) -> None:
    engine = engine_for(lm, speculate=8)
    try:
        speculated = answers(engine, lm.tokenizer, [rag(lm.tokenizer, q) for q in QUESTIONS])
    finally:
        engine.shutdown()
    same = sum(a == b for a, b in zip(speculated, plain))
    report("speculation (bf16: agreement measured)", same >= len(plain) // 2, f"{same} of {len(plain)} identical")


def check_split_device_map(plain: list) -> None:
    # 60 MiB of the GPU for the layers: the first few there, the rest (and the head) on the CPU.
    lm = load(None, device="auto", dtype="bfloat16", max_memory={0: "60MiB", "cpu": "8GiB"})
    devices = sorted({str(d) for d in getattr(lm.model, "hf_device_map", {}).values()})
    report("split device map placed", len(devices) >= 2, f"devices {devices}")
    engine = engine_for(lm, speculate=8)
    try:
        split = answers(engine, lm.tokenizer, [rag(lm.tokenizer, q) for q in QUESTIONS])
        copied = engine.kv.batch.copied_bytes["hit"]
    finally:
        engine.shutdown()
    same = sum(a == b for a, b in zip(split, plain))
    report("split device map serves", all(split) and "Krell" in split[0],
           f"{same} of {len(plain)} as on one GPU, copied hit bytes {copied}")


def check_speed(lm) -> None:
    prompt = encode_prompt(lm.tokenizer, [{"role": "user", "content": "Write a long story about a lighthouse."}])
    ids = torch.tensor([prompt], device=DEVICE)
    lm.model.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up
    synchronize()
    started = time.perf_counter()
    lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128,
                      do_sample=False)
    synchronize()
    generate_rate = 128 / (time.perf_counter() - started)
    engine = engine_for(lm, speculate=0)
    try:
        answers(engine, lm.tokenizer, [prompt], 8)
        rates = {}
        for streams in (1, 16):
            started = time.perf_counter()
            answers(engine, lm.tokenizer, [prompt] * streams, 128, exact_length=True)
            rates[streams] = streams * 128 / (time.perf_counter() - started)
    finally:
        engine.shutdown()
    report("decode rates (bf16, in-process)", rates[1] > 0.5 * generate_rate,
           f"1 stream {rates[1]:.0f} tok/s ({rates[1] / generate_rate:.2f}x model.generate {generate_rate:.0f}), "
           f"16 streams {rates[16]:.0f} tok/s")


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}, CUDA build: {torch.version.cuda}): "
              "nothing to check; run it on a machine with an NVIDIA GPU and a CUDA build of torch", flush=True)
        return 0
    where = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "the CPU"
    print(f"gpu-check on {where}, torch {torch.__version__}", flush=True)
    lm = load(None, device=DEVICE, dtype="bfloat16")
    plain = check_answers_and_hits(lm)
    check_speculation(lm, plain)
    check_speed(lm)
    del lm
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        check_split_device_map(plain)
    if time.monotonic() > DEADLINE:
        report("within 8 minutes", False, "the checks took longer")
    print(f"gpu-check: {len(failures)} failed" + (f" ({', '.join(failures)})" if failures else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
