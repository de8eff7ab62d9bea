"""The data sources a ``DatasetConfig.source`` can name, in one registry.

A source is a TFDS builder (``builders._Builder``: reads the files at a path into ArrayRecord
once) and the kind of example its records make: ``'pairs'`` (image-text pairs), ``'documents'``
(interleaved documents) or ``'video'`` (video-text pairs). Sources that read data a package
ships give a ``default_path`` and need no ``DatasetConfig.path``. Adding a source is one builder
and one registration, e.g. in a project's package (which its gin file imports)::

    from flamingo_jax.data import builders, sources

    class MyCaptions(builders.Builder):
        FEATURES = builders.PAIR_FEATURES
        def _generate_examples(self):
            ...  # yield key, {"key": ..., "image": bytes, "caption": bytes, "meta": "{}"}

    sources.SOURCES.register("my_captions", sources.Source("pairs", MyCaptions))

``'synthetic'`` (generated documents, no files) is built in and not a registered source.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from flamingo_jax.data import builders, episodes
from flamingo_jax.registry import Registry

KINDS = ("pairs", "documents", "video")
SYNTHETIC = "synthetic"


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str
    builder: type
    default_path: Callable[[], str | None] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Source {self.builder.__name__}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def needs_path(self) -> bool:
        return self.default_path is None


SOURCES: Registry[Source] = Registry("data source")
SOURCES.register("webdataset", Source("pairs", builders.WebdatasetPairs))
SOURCES.register("mmc4", Source("documents", builders.MMC4Documents))
SOURCES.register("obelics", Source("documents", builders.ObelicsDocuments))
SOURCES.register("video", Source("video", builders.VideoCaptions))
# Few-shot episodes of registered image collections (DatasetConfig.options names them); the
# collections find their own files, so the path is only the builder's nominal source.
SOURCES.register("episodes", Source("documents", episodes.EpisodeDocuments, lambda: os.path.dirname(episodes.__file__)))
