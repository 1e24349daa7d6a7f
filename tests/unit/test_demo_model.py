"""The demo model's recipe on its own: chat transcripts from the play, training that learns (small and fast
here; the CLI test builds the real one and reads its answers)."""

import torch

from executor.demo_model import DEMO_TEXT, build_tokenizer, chat_transcripts, new_gpt2, train


def test_the_play_becomes_chat_turns_without_speaker_names():
    play = "First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved.\n\nAll:\nResolved."
    (chat,) = chat_transcripts(play, turns=4)
    assert chat == ("<|im_start|>user\nBefore we proceed.<|im_end|>\n<|im_start|>assistant\nSpeak, speak.<|im_end|>\n"
                    "<|im_start|>user\nYou are all resolved.<|im_end|>\n<|im_start|>assistant\nResolved.<|im_end|>\n")
    text = DEMO_TEXT.read_text(encoding="utf-8")
    assert 100_000 < len(text.encode()) < 400_000 and text.isascii()


def test_training_lowers_the_loss():
    chats = chat_transcripts(DEMO_TEXT.read_text(encoding="utf-8"))[:200]
    tokenizer = build_tokenizer(vocab_size=512, texts=chats)
    ids = tokenizer("".join(chats), add_special_tokens=False)["input_ids"]
    model = new_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    window = torch.tensor([ids[:64]])
    with torch.no_grad():
        before = model(input_ids=window, labels=window).loss.item()
    after = train(model, ids, steps=60, batch=8, length=64, learning_rate=3e-3, seed=0)
    assert after < before - 1.0, (before, after)
