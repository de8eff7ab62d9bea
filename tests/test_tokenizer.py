"""Tokenizers: the Flamingo tokens, and answers cut at every end token the tokenizer declares
(a chat model's end-of-turn token is the GGUF's EOS: it must never be scored or shown)."""

from __future__ import annotations

import os

import pytest

from flamingo_jax.tokenizer import Tokenizer, load_tokenizer


def test_bytes_tokenizer_round_trip_and_flamingo_tokens():
    tokenizer = Tokenizer.from_bytes()
    ids = tokenizer.encode("<image>a cat<|endofchunk|>")
    assert ids[0] == tokenizer.media_token_id == 259 and ids[-1] == tokenizer.endofchunk_token_id == 260
    assert tokenizer.decode(ids) == "<image>a cat<|endofchunk|>"
    assert tokenizer.decode(ids, skip_special=True) == "a cat"


def test_answers_are_cut_at_the_first_end_token():
    tokenizer = Tokenizer.from_bytes()
    assert tokenizer.end_token_ids == (tokenizer.endofchunk_token_id, tokenizer.eos_id)
    cat = tokenizer.encode("a cat")
    assert tokenizer.cut_at_end(cat + [tokenizer.eos_id] + tokenizer.encode("more")) == cat
    assert tokenizer.cut_at_end(cat + [tokenizer.endofchunk_token_id, tokenizer.eos_id]) == cat
    assert tokenizer.cut_at_end(cat) == cat


def test_the_gguf_end_of_turn_token_ends_an_answer():
    """SmolLM2's GGUF declares ``<|im_end|>`` as its EOS: a generation that ends with it decodes
    to the answer alone."""
    from flamingo_jax.demo.weights import smollm2_gguf

    tokenizer = Tokenizer.from_gguf(smollm2_gguf())
    end = tokenizer.encode("<|im_end|>")
    assert end == [tokenizer.eos_id] and tokenizer.eos_id in tokenizer.end_token_ids
    generated = tokenizer.encode(" A photo of a coat.") + end
    assert tokenizer.decode(generated) == " A photo of a coat.<|im_end|>"  # what was scored before
    assert tokenizer.decode(tokenizer.cut_at_end(generated)) == " A photo of a coat."


def test_load_tokenizer_specs():
    import flamingo_jax.demo  # noqa: F401  (registers the 'smollm2' weights)

    assert load_tokenizer("smollm2").base_vocab_size == 49152
    assert load_tokenizer("gguf:smollm2").eos_id == load_tokenizer("smollm2").eos_id
    with pytest.raises(ValueError, match="tokenizer 'nonsense'"):
        load_tokenizer("nonsense")


def _word_level_file(path, words):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(path))


def test_a_tokenizer_file_is_read_once_until_it_changes(tmp_path):
    path = tmp_path / "tokenizer.json"
    _word_level_file(path, ["<unk>", "a", "cat"])
    first = load_tokenizer(f"hf_json:{path}")
    assert load_tokenizer(f"hf_json:{path}")._encode is first._encode  # the same backend: not read again
    assert first.encode("a cat") == [1, 2] and first.base_vocab_size == 3
    os.utime(path, (1, 1))  # rewritten: another modification time
    _word_level_file(path, ["<unk>", "cat", "a", "dog"])
    os.utime(path, (2, 2))
    again = load_tokenizer(f"hf_json:{path}")
    assert again.encode("a cat") == [2, 1] and again.base_vocab_size == 4
