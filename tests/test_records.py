"""TFDS builders from real on-disk formats (written here), read through grain; every bad-record
kind is skipped and counted, and a training step on the result has a finite loss."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from flamingo_jax import configs
from flamingo_jax.batch import Batch, validate
from flamingo_jax.data import builders, records
from flamingo_jax.data.images import ImageConfig
from flamingo_jax.models.flamingo import create_flamingo, token_loss
from flamingo_jax.tokenizer import Tokenizer

from conftest import encoded_image as _jpeg
from conftest import jit_forward

IMAGE = ImageConfig(image_size=16)


def skip_counts(produced: list[dict]) -> dict[str, int]:
    """{reason: count} over the skip reasons the examples carry (removed from them)."""
    counts: dict[str, int] = {}
    for example in produced:
        for reason in records.pop_skipped(example):
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def test_webdataset_pairs_skip_and_count_bad_records(pairs_dir, tmp_path):
    builder = builders.prepare(builders.WebdatasetPairs, source=str(pairs_dir), data_dir=str(tmp_path / "tfds"))
    source = builder.as_data_source("train")
    assert len(source) == 8  # the escaping member was rejected
    assert not any(r["key"] == "../escape" for r in source)
    tokenizer = Tokenizer.from_bytes()
    converter = records.PairConverter(tokenizer, IMAGE, length=32)
    dataset = records.RobustRecords(source, converter, name="wds", seed=0)
    produced = [dataset[i] for i in range(len(dataset))]
    assert len(produced) == 8
    skipped = skip_counts(produced)
    for reason in ("empty_image", "corrupt_image", "empty_text", "bad_text"):
        assert skipped.get(reason, 0) >= 1, skipped
    captions = {tokenizer.decode(e["tokens"][1 : int(e["loss_mask"].sum())]) for e in produced}
    assert captions <= {"a red square", "a black square in CMYK", "a palette image"}
    for example in produced:
        assert np.isfinite(example["images"]).all() and example["images"].shape == (1, 1, 16, 16, 3)
        assert example["tokens"][0] == tokenizer.media_token_id

    # A training step on these examples has a finite loss.
    batch = Batch.from_dict({k: np.stack([e[k] for e in produced]) for k in produced[0]})
    config = configs.load_model_config("models/tiny.gin", ["LlamaConfig.vocab_size = 259"])
    validate(batch, image_shape=(16, 16, 3), vocab_size=config.total_vocab_size)
    logits = jit_forward(create_flamingo(config))(batch.tokens, batch.image_index, batch.image_mask, batch.images)
    loss, count = jax.jit(token_loss)(logits, batch)
    assert np.isfinite(float(loss)) and float(count) > 0


def test_mmc4_documents(tmp_path):
    source = tmp_path / "mmc4"
    source.mkdir()
    (source / "cat.jpg").write_bytes(_jpeg((250, 250, 0)))
    (source / "dog.png").write_bytes(_jpeg((0, 0, 250), fmt="PNG"))
    (source / "broken.jpg").write_bytes(b"\x89PNG broken")

    def info(name, index=0):
        return {"image_name": name, "matched_text_index": index}

    documents = [
        {"text_list": ["A cat.", "It sleeps.", "A dog."], "image_info": [info("cat.jpg"), info("dog.png", 2)]},
        {"text_list": ["Only a missing image."], "image_info": [info("missing.jpg")]},
        {"text_list": ["A broken image, then text."], "image_info": [info("broken.jpg")]},
    ]
    with open(source / "docs.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in documents)
        f.write("{not json\n")
    builder = builders.prepare(builders.MMC4Documents, source=str(source), data_dir=str(tmp_path / "tfds"))
    data = builder.as_data_source("train")
    assert len(data) == 3
    tokenizer = Tokenizer.from_bytes()
    converter = records.DocumentConverter(tokenizer, IMAGE, length=48)
    dataset = records.RobustRecords(data, converter, name="mmc4", seed=0)
    produced = [dataset[i] for i in range(3)]
    assert all(int(e["image_mask"].sum()) == 2 for e in produced)  # every index lands on the good document
    skipped = skip_counts(produced)
    assert skipped["no_images"] >= 2
    assert skipped["document_image/empty_image"] >= 1  # missing file
    assert skipped["document_image/corrupt_image"] >= 1
    text = tokenizer.decode(produced[0]["tokens"], skip_special=False)
    assert "A cat." in text and "A dog." in text and "<|endofchunk|>" in text
    np.testing.assert_array_equal(
        produced[0]["image_index"], np.cumsum(produced[0]["tokens"] == tokenizer.media_token_id) - 1
    )


def test_missing_source_fails_at_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="source .*nowhere.* does not exist"):
        builders.WebdatasetPairs(source=str(tmp_path / "nowhere"), data_dir=str(tmp_path))
    assert (
        builders.safe_member_name("a/b.jpg")
        and not builders.safe_member_name("../x")
        and not builders.safe_member_name("/etc/x")
    )


@pytest.mark.slow
def test_training_run_on_a_webdataset_mixture_counts_skips(pairs_dir, tmp_path):
    """The entry point trains on real tar shards mixed with generated documents; skipped
    records reach the metrics and the loss stays finite."""
    from test_main import run_main

    from flamingo_jax.train.writer import read_metrics

    bindings = [
        "LlamaConfig.vocab_size=259",
        "RunConfig.tokenizer='bytes'",
        "RunConfig.datasets=[@interleaved/DatasetConfig(), @wds/DatasetConfig()]",
        "wds/DatasetConfig.name='wds'",
        "wds/DatasetConfig.batch_size=8",
        "wds/DatasetConfig.loss_weight=0.2",
        "wds/DatasetConfig.source='webdataset'",
        f"wds/DatasetConfig.path='{pairs_dir}'",
        f"wds/DatasetConfig.data_dir='{tmp_path / 'tfds'}'",
        "wds/DatasetConfig.length=32",
        "TRAIN_STEPS=3",
        "LOG_EVERY=1",
        "CHECKPOINT_EVERY=3",
    ]
    result = run_main(str(tmp_path / "run"), *bindings)
    assert result.returncode == 0, result.stderr[-3000:]
    last = read_metrics(str(tmp_path / "run"))[-1]
    assert np.isfinite(last["loss/wds"]) and last["targets/wds"] > 0
    assert last["skipped/wds/corrupt_image"] >= 1 and last["skipped/wds/empty_text"] >= 1

    result = run_main(str(tmp_path / "bad"), *bindings[:-3], "LlamaConfig.vocab_size=128")
    assert result.returncode != 0 and "RunConfig.tokenizer='bytes' has 259 base tokens" in result.stderr


def test_sample_with_every_label_masked_is_skipped_and_counted():
    """A document whose only image ends the window has nothing to learn: skipped as
    'no_targets', and the next record is used instead."""
    image = _jpeg((10, 200, 10))

    def document(text):
        return {"texts": json.dumps([text]), "images": [image], "matched_text_index": np.asarray([0], np.int32)}

    tokenizer = Tokenizer.from_bytes()
    # p_next = 0: the image follows its text. "Hello there.<image><|endofchunk|>" is 14 tokens; the
    # 13-token window starting at 0 ends on <image> (no target), the one starting at 1 keeps the
    # <|endofchunk|> target. Over seeds, both happen.
    converter = records.DocumentConverter(tokenizer, IMAGE, length=13, p_next=0.0, train=False)
    source = [document("Hello there."), document("Hi.")]
    outcomes = set()
    for seed in range(16):
        example = records.RobustRecords(source, converter, name="docs", seed=seed)[0]
        skipped = records.pop_skipped(example)
        text = tokenizer.decode(example["tokens"], skip_special=False)
        if skipped:
            assert skipped == ["no_targets"] and text.startswith("Hi.<image><|endofchunk|>")
        else:
            assert text == "ello there.<image><|endofchunk|>"
        assert example["loss_mask"].sum() == 1  # the <|endofchunk|> after the image
        outcomes.add(bool(skipped))
    assert outcomes == {True, False}
