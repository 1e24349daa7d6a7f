"""The benchmark's long-prompt workloads, sized in tokens of the benchmark's tokenizer.

RAG-shaped: a system prompt with five retrieved passages that every request shares, then the user's own
question; a conversation that resends its history each turn; long distinct prompts for the decode rate at
a long context. Random words from a seeded generator, so every run asks the same.
"""

import random

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _words(rng: random.Random, tokenizer, tokens: int) -> str:
    """About ``tokens`` tokens of random words."""
    words = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
        words.extend("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 9))) for _ in range(8))
    return " ".join(words)


def rag_prompts(tokenizer, count: int, seed: int, shared_tokens: int = 520, question_tokens=(60, 180)) -> tuple:
    """``count`` chats sharing one system prompt with five passages (about ``shared_tokens`` tokens), each with
    its own question; and one more question behind the same passages (the warm-prefix request)."""
    rng = random.Random(seed)
    passages = [_words(rng, tokenizer, shared_tokens // 5) for _ in range(5)]
    system = ("Answer the question from the passages below. Cite the passage you use.\n\n"
              + "\n\n".join(f"Passage {i + 1}: {text}" for i, text in enumerate(passages)))
    chats = [[{"role": "system", "content": system},
              {"role": "user", "content": _words(rng, tokenizer, rng.randint(*question_tokens))}]
             for _ in range(count)]
    warm = [{"role": "system", "content": system}, {"role": "user", "content": _words(rng, tokenizer, 40)}]
    return chats, warm


def chat_turn_messages(tokenizer, turns: int, seed: int) -> list:
    """The user's messages of a conversation (about 40 tokens each), after a short system prompt."""
    rng = random.Random(seed)
    return [_words(rng, tokenizer, 40) for _ in range(turns)]


def rag_conversations(tokenizer, count: int, seed: int, passage_tokens: int = 400) -> list:
    """``count`` conversations, each behind passages of its own (a system prompt of about ``passage_tokens``
    tokens): the first message of each; later questions come from ``chat_turn_messages``."""
    rng = random.Random(seed)
    return [[{"role": "system", "content": "Answer from these passages.\n\n" + _words(rng, tokenizer, passage_tokens)}]
            for _ in range(count)]


def long_prompts(tokenizer, count: int, tokens: int, seed: int) -> list:
    """``count`` distinct chats of about ``tokens`` tokens each."""
    rng = random.Random(seed)
    return [[{"role": "user", "content": _words(rng, tokenizer, tokens)}] for _ in range(count)]


# Real English for the real model to quote (an answer that copies its passage: what prompt lookup speeds up).
QUOTE_PASSAGE = (
    "The lighthouse on Karsk Point was built in 1871 from granite quarried on the island itself. Its lamp was "
    "first lit with whale oil, then with kerosene, and since 1934 with electricity brought over a cable laid on "
    "the sea floor. The keeper's house beside the tower holds a small museum: the original lens, the logbooks "
    "of four generations of keepers, and a barometer that has hung in the same place for more than a century. "
    "Visitors can climb the 117 steps to the gallery from May to September, when the ferry runs twice a day.")


def quote_prompt() -> list:
    """A chat whose answer, greedy, copies its passage."""
    return [{"role": "system", "content": "Here is a passage:\n\n" + QUOTE_PASSAGE},
            {"role": "user", "content": "Copy the passage above word for word."}]
