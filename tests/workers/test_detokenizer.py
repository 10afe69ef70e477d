"""IncrementalDetokenizer: streamed deltas add up to `tokenizer.decode(output)`, and no delta ever
carries half a character.

Runs on a byte-level BPE trained here (offline, in milliseconds, small enough that emoji and CJK
split over several tokens), and on the default model's tokenizer (the shared conftest fixture)."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from splitserve.workers.detokenizer import IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Streaming text one token at a time.",
    "Numbers 12345 and symbols #$%&*() too.",
]
SAMPLES = [
    "Hello, world! The fox jumps.",
    "Café crème — naïve façade 🙂🚀 done",
    "漢字とかなの混じった文 ✅ ok",
    "emoji at the very end 🎉",
    "  leading spaces\nand\tnewlines\n\n",
]


@pytest.fixture(scope="module")
def tiny_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def stream(tokenizer, prompt_ids, output_ids, chunk=1):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.append(output_ids[i:i + chunk]) for i in range(0, len(output_ids), chunk)]
    deltas.append(detok.flush())
    return detok, deltas


def check_roundtrip(tokenizer, text, chunk=1):
    prompt_ids = tokenizer.encode("Say something:", add_special_tokens=False)
    output_ids = tokenizer.encode(text, add_special_tokens=False)
    detok, deltas = stream(tokenizer, prompt_ids, output_ids, chunk)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text
    assert detok.text == tokenizer.decode(output_ids, skip_special_tokens=True) == text


def test_tiny_bpe_really_splits_characters(tiny_bpe):
    # Guard for the tests below: they are only meaningful if some token is half a character.
    ids = tiny_bpe.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    assert "\ufffd" in tiny_bpe.decode(ids[:1])


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_equals_full_decode(tiny_bpe, text, chunk):
    check_roundtrip(tiny_bpe, text, chunk)


def test_partial_character_is_held_back_then_emitted(tiny_bpe):
    ids = tiny_bpe.encode("a🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(tiny_bpe, [])
    deltas = [detok.append([t]) for t in ids]
    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(ids) - 2)
    assert deltas[-1] == "🙂"


def test_special_tokens_are_skipped_or_kept(tiny_bpe):
    eos = tiny_bpe.eos_token_id
    ids = tiny_bpe.encode("hi", add_special_tokens=False) + [eos]
    skip = IncrementalDetokenizer(tiny_bpe, [])
    assert "".join(skip.append([t]) for t in ids) == "hi"
    keep = IncrementalDetokenizer(tiny_bpe, [], skip_special_tokens=False)
    assert "".join(keep.append([t]) for t in ids) == "hi<eos>"


def test_flush_emits_an_unfinished_character_like_decode(tiny_bpe):
    ids = tiny_bpe.encode("ok🙂", add_special_tokens=False)[:-1]  # cut mid-emoji (max_tokens)
    detok, deltas = stream(tiny_bpe, [], ids)
    assert "\ufffd" not in "".join(deltas[:-1])
    assert deltas[-1].startswith("\ufffd")
    assert detok.text == tiny_bpe.decode(ids)


def test_long_output_keeps_a_small_window(tiny_bpe):
    ids = tiny_bpe.encode("The lazy dog. " * 200, add_special_tokens=False)
    detok, _ = stream(tiny_bpe, [], ids)
    assert detok.text == tiny_bpe.decode(ids)
    assert len(detok._ids) < 10  # memory does not grow with the output


@pytest.mark.parametrize("text", SAMPLES + ["I don't think it's 3 . 5 , really ?"])
def test_default_model_tokenizer(smollm2_tokenizer, text):
    check_roundtrip(smollm2_tokenizer, text)


def test_default_model_tokenizer_skips_chat_markers(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("<|im_start|>assistant\nSure 🙂<|im_end|>", add_special_tokens=False)
    detok, deltas = stream(tok, [], ids)
    assert detok.text == tok.decode(ids, skip_special_tokens=True) == "assistant\nSure 🙂"
