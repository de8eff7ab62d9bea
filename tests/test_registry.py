"""Registries: one per concept; a project's data source is one builder and one registration, and
the library then reads it like its own; names fail early and clearly."""

from __future__ import annotations

import numpy as np
import pytest

from flamingo_jax.batch import Batch, validate
from flamingo_jax.data import builders, mixture, sources
from flamingo_jax.registry import Registry
from flamingo_jax.tokenizer import Tokenizer

from conftest import encoded_image


def test_registry_names_entries_and_refuses_a_second_one():
    registry = Registry("widget")
    registry.register("a", 1)

    @registry.register("b")
    def b():
        return 2

    assert registry["a"] == 1 and registry["b"]() == 2 and list(registry) == ["a", "b"] and "a" in registry
    registry.register("a", 1)  # the same entry again (a module imported twice) is fine
    with pytest.raises(ValueError, match="widget 'a' is registered already"):
        registry.register("a", 3)
    with pytest.raises(KeyError, match=r"unknown widget 'c'; registered: \['a', 'b'\]"):
        registry["c"]
    with pytest.raises(ValueError, match=r"Config.field: unknown widget 'c'"):
        registry.check(["a", "c"], "Config.field")


class ProjectCaptions(builders.Builder):
    """A project's own source: four captioned squares, generated at ``source`` (a folder)."""

    FEATURES = builders.PAIR_FEATURES

    def _generate_examples(self):
        for index in range(4):
            image = encoded_image((60 * index, 0, 0))
            yield str(index), {"key": str(index), "image": image, "caption": f"square {index}".encode(), "meta": "{}"}


def test_a_project_source_is_one_builder_and_one_registration(tmp_path):
    sources.SOURCES.register("project_captions", sources.Source("pairs", ProjectCaptions))
    config = mixture.DatasetConfig(
        name="mine",
        batch_size=2,
        source="project_captions",
        path=str(tmp_path),
        data_dir=str(tmp_path / "ready"),
        length=16,
    )
    tokenizer = Tokenizer.from_bytes()
    token_ids = mixture.TokenIds(tokenizer.base_vocab_size, tokenizer.media_token_id, tokenizer.endofchunk_token_id)
    stream = mixture.dataset_stream(
        config, token_ids, seed=0, process_index=0, process_count=1, tokenizer=tokenizer, image_size=16
    )
    fields = mixture.split_skipped({"mine": stream[0]})[0]["mine"]
    batch = Batch.from_dict(fields)
    validate(batch, vocab_size=tokenizer.vocab_size)
    assert batch.tokens.shape == (2, 16) and batch.images.shape[:3] == (2, 1, 1)
    text = tokenizer.decode(np.asarray(batch.tokens[0]), skip_special=True)
    assert text.startswith("square ")
    with pytest.raises(ValueError, match="unknown data source 'project_captionz'; registered:"):
        mixture.DatasetConfig(name="typo", batch_size=2, source="project_captionz")
