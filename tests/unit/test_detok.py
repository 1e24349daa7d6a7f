"""The incremental detokenizer: joined deltas equal the full decode, exactly; stop strings never leak."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from executor.detok import IncrementalDetokenizer, decode, held_back_length
from tiny_models import build_tokenizer
from helpers import sentencepiece_tokenizer

TEXTS = [
    "Hello world, how are you?",
    "déjà vu, café, naïve — Grüße aus der Straße",
    "中文：你好，世界。日本語：こんにちは",
    "Emoji 😀🚀🎉 family 👩‍💻 flag 🇩🇪 heart ❤️",
    "  leading and   multiple   spaces\nnew line\ttab",
    "mixed 😀 ascii 中文 and é at the end é",
    "unseen characters ✈ ⚓ 𝄞 🦄 in the vocabulary",
]


@pytest.fixture(scope="module", params=["byte_level_bpe", "sentencepiece"])
def tokenizer(request):
    return build_tokenizer() if request.param == "byte_level_bpe" else sentencepiece_tokenizer()


def stream(tokenizer, ids, stop=()):
    detok = IncrementalDetokenizer(tokenizer, tuple(stop))
    chunks = []
    for token in ids:
        chunks.append(detok.push(token))
        if detok.stopped:
            return chunks, detok
    chunks.append(detok.flush())
    return chunks, detok


@pytest.mark.parametrize("text", TEXTS)
def test_joined_chunks_equal_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks, _ = stream(tokenizer, ids)
    assert "".join(chunks) == decode(tokenizer, ids)
    assert all("\ufffd" not in chunk for chunk in chunks), "a chunk carried half of a character"


def test_multibyte_characters_split_over_tokens_are_held_back():
    tokenizer = build_tokenizer()
    ids = tokenizer("🦄", add_special_tokens=False)["input_ids"]  # not in the corpus: one token per byte
    assert len(ids) > 1
    chunks, _ = stream(tokenizer, ids)
    assert chunks[:-2] == [""] * (len(ids) - 1) or "".join(chunks) == "🦄"
    assert [c for c in chunks if c] == ["🦄"]


def test_sentencepiece_spaces_survive():
    tokenizer = sentencepiece_tokenizer()
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks, _ = stream(tokenizer, ids)
    assert "".join(chunks) == decode(tokenizer, ids) == text
    assert any(chunk.startswith(" ") for chunk in chunks[1:])


def test_sentencepiece_byte_fallback_pieces_join_into_characters():
    tokenizer = sentencepiece_tokenizer()
    ids = tokenizer("a 🦄 b", add_special_tokens=False)["input_ids"]
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    chunks, _ = stream(tokenizer, ids)
    assert "".join(chunks) == "a 🦄 b"
    assert all("\ufffd" not in c for c in chunks)


_TOKENIZERS = {"byte_level_bpe": build_tokenizer(), "sentencepiece": sentencepiece_tokenizer()}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(_TOKENIZERS)), st.data())
def test_any_id_sequence_joins_to_the_full_decode(kind, data):
    """Random models emit arbitrary ids, broken UTF-8 included: the stream still matches the decode."""
    tokenizer = _TOKENIZERS[kind]
    ids = data.draw(st.lists(st.integers(min_value=0, max_value=len(tokenizer) - 1), max_size=40))
    chunks, _ = stream(tokenizer, ids)
    assert "".join(chunks) == decode(tokenizer, ids)


def test_stop_string_is_never_streamed():
    tokenizer = build_tokenizer()
    text = "Hello, how are you? I am fine, thank you."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks, detok = stream(tokenizer, ids, stop=["I am"])
    assert detok.stopped
    assert "".join(chunks) == "Hello, how are you? "
    assert all("I" not in chunk for chunk in chunks)


def test_partial_stop_string_is_released_when_it_does_not_complete():
    tokenizer = build_tokenizer()
    text = "Hello, how are you? I am fine"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks, detok = stream(tokenizer, ids, stop=["I was"])
    assert not detok.stopped
    assert "".join(chunks) == text


def test_earliest_of_several_stop_strings_wins():
    tokenizer = build_tokenizer()
    ids = tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    chunks, _ = stream(tokenizer, ids, stop=["four", "two"])
    assert "".join(chunks) == "one "


@pytest.mark.parametrize("text,stops,expected", [
    ("abc", ["cd"], 1), ("abc", ["bcd"], 2), ("abc", ["x"], 0), ("abc", ["abcd", "c"], 3), ("", ["a"], 0),
])
def test_held_back_length(text, stops, expected):
    assert held_back_length(text, stops) == expected
