"""TFDS builders (ArrayRecord output, no TensorFlow) for the formats people have on disk.

Records keep the encoded bytes: decoding, tokenisation and augmentation happen in the grain
pipeline, where a bad record is skipped and counted instead of failing the build.

* ``WebdatasetPairs``: img2dataset / webdataset tar shards of ``KEY.jpg`` + ``KEY.txt`` (+ ``KEY.json``).
* ``MMC4Documents``: MMC4-style jsonl (``text_list``, ``image_info`` with ``image_name`` and
  ``matched_text_index``) plus a directory of image files.

Read a prepared dataset with ``builder.as_data_source('train')`` (random access for grain). The
records are shuffled on disk: index order is not generation order.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
import tarfile

import numpy as np
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def safe_member_name(name: str) -> bool:
    """False for tar member paths that would escape an extraction directory."""
    normal = posixpath.normpath(name)
    return not (name.startswith(("/", "\\")) or normal == ".." or normal.startswith("../") or ":" in name.split("/")[0])


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Common plumbing: a source path, ArrayRecord output, one 'train' split."""

    VERSION = tfds.core.Version("1.0.0")
    FEATURES: dict = {}

    def __init__(self, *, source: str, **kwargs):
        if not os.path.exists(source):
            raise FileNotFoundError(f"{type(self).__name__}: source {source!r} does not exist")
        self._source = source
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(self.FEATURES))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}


def _bytes_feature():
    return tfds.features.Tensor(shape=(), dtype=np.object_)


class WebdatasetPairs(_Builder):
    """Image-text pairs from ``*.tar`` shards (or one shard) at ``source``."""

    FEATURES = {
        "key": tfds.features.Text(),
        "image": _bytes_feature(),
        "caption": _bytes_feature(),
        "meta": tfds.features.Text(),
    }

    def _generate_examples(self):
        shards = (
            sorted(glob.glob(os.path.join(self._source, "*.tar"))) if os.path.isdir(self._source) else [self._source]
        )
        if not shards:
            raise FileNotFoundError(f"WebdatasetPairs: no .tar shards in {self._source}")
        rejected = 0
        for shard in shards:
            samples: dict[str, dict] = {}
            with tarfile.open(shard) as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    if not safe_member_name(member.name):
                        rejected += 1
                        log.warning(
                            "%s: rejected tar member %r (path escapes the output directory)", shard, member.name
                        )
                        continue
                    key, suffix = os.path.splitext(member.name)
                    samples.setdefault(key, {})[suffix.lower()] = archive.extractfile(member).read()
            for key, files in samples.items():
                image = next((files[s] for s in IMAGE_SUFFIXES if s in files), None)
                if image is None and ".txt" not in files:
                    continue
                yield (
                    f"{os.path.basename(shard)}/{key}",
                    {
                        "key": key,
                        "image": image if image is not None else b"",
                        "caption": files.get(".txt", b""),
                        "meta": files.get(".json", b"{}").decode("utf-8", "replace"),
                    },
                )
        if rejected:
            log.warning("WebdatasetPairs: %d unsafe tar members rejected", rejected)


class MMC4Documents(_Builder):
    """Interleaved documents from MMC4-style ``*.jsonl`` files and an image directory.

    ``source`` is the directory holding the jsonl files; ``image_dir`` (default: ``source``)
    holds the files named by ``image_info[*].image_name``. A missing image file is stored as
    empty bytes (skipped and counted downstream).
    """

    FEATURES = {
        "key": tfds.features.Text(),
        "texts": tfds.features.Text(),
        "images": tfds.features.Sequence(_bytes_feature()),
        "matched_text_index": tfds.features.Sequence(np.int32),
    }

    def __init__(self, *, source: str, image_dir: str | None = None, **kwargs):
        self._image_dir = image_dir or source
        super().__init__(source=source, **kwargs)

    def _generate_examples(self):
        files = sorted(glob.glob(os.path.join(self._source, "*.jsonl")))
        if not files:
            raise FileNotFoundError(f"MMC4Documents: no .jsonl files in {self._source}")
        for path in files:
            with open(path, "rb") as f:
                for line_number, line in enumerate(f, 1):
                    try:
                        document = json.loads(line)
                        texts = [str(t) for t in document["text_list"]]
                        infos = list(document.get("image_info") or [])
                    except (ValueError, KeyError, TypeError) as error:
                        log.warning("%s:%d: skipped unreadable document (%s)", path, line_number, error)
                        continue
                    images, matched = [], []
                    for info in infos:
                        name = os.path.basename(str(info.get("image_name", "")))
                        image_path = os.path.join(self._image_dir, name)
                        images.append(_read_or_empty(image_path) if name else b"")
                        matched.append(int(info.get("matched_text_index", 0)))
                    yield (
                        f"{os.path.basename(path)}:{line_number}",
                        {
                            "key": f"{os.path.basename(path)}:{line_number}",
                            "texts": json.dumps(texts),
                            "images": images,
                            "matched_text_index": np.asarray(matched, np.int32),
                        },
                    )


def _read_or_empty(path: str) -> bytes:
    if not os.path.isfile(path):
        return b""
    with open(path, "rb") as f:
        return f.read()


def prepare(builder_cls, *, source: str, data_dir: str, **kwargs):
    """Builds (once) and returns the builder; its ``as_data_source('train')`` feeds grain."""
    builder = builder_cls(source=source, data_dir=data_dir, **kwargs)
    builder.download_and_prepare()
    return builder
