"""The conversion CLI writes a checkpoint that training's init_from loads; tokenizers from
sentencepiece and tokenizer.json files."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [reference] extra (torch, transformers)")
transformers = pytest.importorskip("transformers")

from test_train import smoke_config  # noqa: E402

from flamingo_jax import sharding  # noqa: E402
from flamingo_jax.importers import llama  # noqa: E402
from flamingo_jax.tokenizer import Tokenizer  # noqa: E402
from flamingo_jax.train.loop import build_training  # noqa: E402

pytestmark = pytest.mark.reference


def _tiny_hf_llama(directory, vocab=128, width=64):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def test_convert_cli_output_loads_as_init_from(tmp_path):
    _tiny_hf_llama(tmp_path / "hf", vocab=259)  # the smoke run's (byte tokenizer's) vocabulary
    output = tmp_path / "converted"
    command = [
        sys.executable,
        "-m",
        "flamingo_jax.tools.convert",
        "--gin_file=models/tiny.gin",
        "--gin_bindings=LlamaConfig.vocab_size=259",
    ]
    result = subprocess.run(command + [f"--lm={tmp_path / 'hf'}", f"--output={output}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout

    config = dataclasses.replace(smoke_config(), init_from=str(output))
    training = build_training(config, sharding.create_mesh(config.mesh))
    _, expected = llama.load_hf_llama(str(tmp_path / "hf"))
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(training.frozen[f"lm/{key}"]), value, err_msg=key)
    # The new rows start from the LM: <image> as the mean input embedding.
    new_rows = np.asarray(training.state.params["new_tokens/embed"])
    np.testing.assert_allclose(new_rows[0], expected["embed"].mean(axis=0), rtol=1e-5, atol=1e-7)


def test_convert_rejects_mismatched_weights(tmp_path):
    _tiny_hf_llama(tmp_path / "hf", width=32)
    command = [sys.executable, "-m", "flamingo_jax.tools.convert", "--gin_file=models/tiny.gin"]
    result = subprocess.run(
        command + [f"--lm={tmp_path / 'hf'}", f"--output={tmp_path / 'out'}"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "LlamaConfig.width is 32 in the weights but 64 in the model config" in result.stderr


def test_sentencepiece_and_tokenizer_json(tmp_path):
    import sentencepiece
    import tokenizers

    sentences = [
        f"the {animal} sat on the {thing} number {n}"
        for animal in ("cat", "dog", "bird")
        for thing in ("mat", "log")
        for n in range(30)
    ]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "sp"), vocab_size=60, model_type="bpe"
    )
    sp = Tokenizer.from_sentencepiece(str(tmp_path / "sp.model"))
    ids = sp.encode("<image>the cat sat<|endofchunk|>", add_bos=True)
    assert ids[0] == sp.bos_id and ids[1] == sp.media_token_id == 60 and ids[-1] == sp.endofchunk_token_id == 61
    assert sp.decode(ids[1:]) == "<image>the cat sat<|endofchunk|>"

    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"[UNK]": 0, "[PAD]": 1, "a": 2, "cat": 3}, unk_token="[UNK]")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    hf = Tokenizer.from_hf_json(str(tmp_path / "tokenizer.json"), pad_token="[PAD]")
    assert hf.encode("a cat<image>") == [2, 3, 4]
    tokens, mask = hf.encode_batch(["a cat", "cat"], 3, padding_side="right")
    assert tokens.tolist() == [[2, 3, 1], [3, 1, 1]] and mask.sum() == 3


def test_flamingo_from_pretrained_uses_the_imported_lm(tmp_path, tiny_config):
    from flamingo_jax.importers.pretrained import flamingo_from_pretrained

    _tiny_hf_llama(tmp_path / "hf")
    model = flamingo_from_pretrained(tiny_config, lm=str(tmp_path / "hf"))
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    tokens = np.random.default_rng(0).integers(0, 128, (1, 9))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    images = np.zeros((1, 1, 1, 16, 16, 3), np.float32)
    logits, _ = model(tokens.astype(np.int32), np.zeros((1, 9), np.int32), np.ones((1, 1), bool), images)
    assert np.abs(np.asarray(logits)[..., :128] - expected).max() <= 1e-4  # gates at 0: exactly the LM
