"""Few-shot episodes: balanced demonstrations, labels bound per episode, nested across shot
counts, held-out classes never in training documents, the JSON-lines format and its errors, and
the encoder-only prototype reference."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.data import episodes as ep
from flamingo_jax.evaluation.episodic import answer_of, episode_prompt, prototype_prediction
from flamingo_jax.tokenizer import Tokenizer

# Twelve classes of solid colours (a class's images differ by a little noise): an image's
# class can be read back from its pixels.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 230, 20),
    "cyan": (20, 220, 220),
    "magenta": (220, 20, 220),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "orange": (250, 140, 0),
    "purple": (110, 0, 160),
    "brown": (120, 70, 20),
    "grey": (128, 128, 128),
}


def colour_image(rgb, seed: int, size: int = 16) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-6, 7, (size, size, 3))
    return np.clip(np.asarray(rgb) + noise, 0, 255).astype(np.uint8)


def write_colour_images(directory, per_class: int = 3) -> None:
    """``directory/<colour><i>.png`` for every colour and i < per_class (episode files' images)."""
    for name, rgb in COLOURS.items():
        for i in range(per_class):
            Image.fromarray(colour_image(rgb, i)).save(directory / f"{name}{i}.png")


def colours(per_class: int = 6) -> ep.Collection:
    return ep.Collection(
        "test_colours",
        tuple(COLOURS),
        tuple(tuple((lambda rgb=rgb, i=i: colour_image(rgb, i)) for i in range(per_class)) for rgb in COLOURS.values()),
    )


if "test_colours" not in ep.COLLECTIONS:
    ep.COLLECTIONS.register("test_colours", colours)


def class_of(image: np.ndarray) -> str:
    mean = image.reshape(-1, 3).mean(axis=0)
    return min(COLOURS, key=lambda name: np.abs(mean - np.asarray(COLOURS[name])).sum())


def test_episodes_are_balanced_bound_per_episode_and_nested():
    collection = colours()
    nested = {}
    for shots in (1, 2, 4):
        episodes = ep.sample_episodes(collection, 60, ways=3, shots=shots, flavour="novel", seed=5, min_images=5)
        nested[shots] = episodes
        for e in episodes:
            assert len(e.candidates) == 3 and len(e.demos) == 3 * shots and e.shots == shots
            assert all(sum(d.label == c for d in e.demos) == shots for c in e.candidates)  # balanced
            assert not set(e.candidates) & set(COLOURS)  # invented words, never a class name
            images = [s.image for s in (*e.demos, e.query)]
            assert len(set(images)) == len(images)  # the query is not a demonstration
            # A label names one class within the episode, and the query's is the answer's.
            by_label = {}
            for shot in (*e.demos, e.query):
                by_label.setdefault(shot.label, set()).add(class_of(collection.load(shot.image)))
            assert all(len(found) == 1 for found in by_label.values())
            assert {next(iter(by_label[c])) for c in e.candidates} == set(e.classes)
            assert e.candidates[e.answer] == e.query.label
    # Bound per episode: the same word is not tied to one class across episodes.
    words = [(c, cls) for e in nested[1] for c, cls in zip(e.candidates, e.classes, strict=True)]
    assert len({w for w, _ in words}) > 100
    assert len({tuple(e.classes) for e in nested[1]}) > 40
    # Nested: the same query, labels and classes; fewer shots' demonstrations among more's, in order.
    for one, two, four in zip(nested[1], nested[2], nested[4], strict=True):
        assert one.query == two.query == four.query and one.candidates == two.candidates == four.candidates
        for small, large in ((one, two), (two, four)):
            kept = [d for d in large.demos if d in small.demos]
            assert kept == list(small.demos)
    # The query's class is uniform over the ways.
    answers = np.bincount([e.answer for e in nested[4]], minlength=3)
    assert answers.min() >= 10
    names = ep.sample_episodes(collection, 5, ways=2, shots=1, flavour="names", seed=0)
    assert all(set(e.candidates) == set(e.classes) for e in names)
    words_episode = ep.sample_episode(
        collection, 2, 1, "words", np.random.default_rng(0), words=["apple", "chair", "red"]
    )
    assert set(words_episode.candidates) <= {"apple", "chair", "red"}
    assert not set(words_episode.candidates) & set(words_episode.classes)


def test_episode_errors_name_what_is_wrong():
    collection = colours(per_class=2)
    with pytest.raises(ValueError, match=r"3-way episodes need 3 classes with 5\+ images, 0 have them"):
        ep.sample_episodes(collection, 1, ways=3, shots=4, flavour="novel", seed=0)
    with pytest.raises(ValueError, match="unknown label flavour 'nonsense'"):
        ep.sample_episodes(collection, 1, ways=2, shots=1, flavour="nonsense", seed=0)
    with pytest.raises(ValueError, match="not a candidate"):
        ep.Episode((), ep.Shot("q.png", "dax"), ("wug", "zib"))
    with pytest.raises(ValueError, match="1 classes but 2 image lists"):
        ep.Collection("bad", ("a",), ((lambda: None,), (lambda: None,)))


def test_heldout_classes_never_in_training_documents(tmp_path):
    """The training documents of EpisodeDocuments hold no image of a held-out class; within a
    document a label always goes with one class, and invented words are never class names."""
    collection = colours()
    training, held = ep.split_classes(collection, 0.3)
    assert held and training and sorted(training + held) == list(range(len(COLOURS)))
    assert ep.split_classes(collection.subset(training), 0.3)[1] == []  # by name: stable under subsets
    builder = ep.EpisodeDocuments(
        source=str(tmp_path),
        collections={"test_colours": {}},
        heldout_fraction=0.3,
        ways=(2, 3),
        shots=(1, 2),
        max_images=7,
        documents=40,
        data_dir=str(tmp_path / "data"),
    )
    held_names = {collection.classes[i] for i in held}
    seen, flavours = set(), set()
    for _, record in builder._generate_examples():
        texts = json.loads(record["texts"])
        labels = [t.removeprefix("A photo of a ").removesuffix(".") for t in texts]
        classes = [class_of(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))) for png in record["images"]]
        assert len(texts) == len(record["images"]) <= 7
        seen |= set(classes)
        pairs = set(zip(labels, classes, strict=True))
        assert len({label for label, _ in pairs}) == len(pairs) == len(set(classes))  # one class per label
        flavours.add(
            "names"
            if all(label == cls for label, cls in pairs)
            else "words"
            if all(label in COLOURS for label, _ in pairs)
            else "novel"
        )
    assert not seen & held_names and len(seen) == len(training)
    assert flavours == {"names", "words", "novel"}


def _png(path, rgb):
    Image.fromarray(colour_image(rgb, 0)).save(path)
    return path.name


def test_episodes_file_round_trip_and_errors(tmp_path):
    for name, rgb in COLOURS.items():
        _png(tmp_path / f"{name}.png", rgb)
    episodes = [
        ep.Episode(
            (ep.Shot("red.png", "dax"), ep.Shot("blue.png", "wug")), ep.Shot("green.png", "dax"), ("dax", "wug"), id="a"
        ),
        ep.Episode((), ep.Shot("cyan.png", "zib"), ("zib", "fep", "tor"), id="b"),
    ]
    path = tmp_path / "episodes.jsonl"
    ep.write_episodes(str(path), episodes)
    read = ep.read_episodes(str(path))
    assert [e.id for e in read] == ["a", "b"] and [e.shots for e in read] == [1, 0]
    assert read[0].demos[1] == ep.Shot(str(tmp_path / "blue.png"), "wug") and read[1].candidates == (
        "zib",
        "fep",
        "tor",
    )
    assert class_of(ep.load_image(read[0].query.image)) == "green"
    lines = path.read_text().splitlines()
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + lines[1].replace('"candidates"', '"labels"') + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not an episode record \(KeyError"):
        ep.read_episodes(str(tmp_path / "bad.jsonl"))
    (tmp_path / "missing.jsonl").write_text(lines[0].replace("blue.png", "nowhere.png") + "\n")
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl:1: image .*nowhere.png does not exist"):
        ep.read_episodes(str(tmp_path / "missing.jsonl"))
    (tmp_path / "wrong.jsonl").write_text(
        lines[0].replace('"label": "dax"}, "candidates"', '"label": "x"}, "candidates"')
    )
    with pytest.raises(ValueError, match=r"wrong.jsonl:1: .*the query's label 'x' is not a candidate"):
        ep.read_episodes(str(tmp_path / "wrong.jsonl"))


def test_prompt_tokens_follow_the_training_documents_and_the_prototype_reference():
    """The prompt is tokenised text by text as a training document (a leading space after the
    first), the candidates continue it, the label positions hold the labels; with the template
    '{}.' the query ends at its <image>."""
    tokenizer = Tokenizer.from_bytes()
    episode = ep.Episode(
        (ep.Shot("a", "dax"), ep.Shot("b", "wug"), ep.Shot("c", "dax")), ep.Shot("q", "wug"), ("dax", "wug")
    )
    prompt = episode_prompt(tokenizer, episode)
    assert tokenizer.decode(prompt.tokens) == (
        "<image>A photo of a dax.<|endofchunk|><image> A photo of a wug.<|endofchunk|>"
        "<image> A photo of a dax.<|endofchunk|><image> A photo of a"
    )
    assert [tokenizer.decode(c) for c in prompt.candidates] == [" dax.", " wug."]
    assert {k: tokenizer.decode([prompt.tokens[i] for i in v]) for k, v in prompt.label_positions.items()} == {
        "dax": " dax dax",
        "wug": " wug",
    }
    short = episode_prompt(tokenizer, episode, "{}.")
    assert tokenizer.decode(short.tokens) == (
        "<image>dax.<|endofchunk|><image> wug.<|endofchunk|><image> dax.<|endofchunk|><image>"
    )
    assert [tokenizer.decode(c) for c in short.candidates] == [" dax.", " wug."]
    assert tokenizer.decode([short.tokens[i] for i in short.label_positions["dax"]]) == "dax dax"
    alone = episode_prompt(tokenizer, ep.Episode((), ep.Shot("q", "dax"), ("dax", "wug")), "{}.")
    assert alone.tokens == [tokenizer.media_token_id] and tokenizer.decode(alone.candidates[1]) == "wug."
    with pytest.raises(ValueError, match="exactly one"):
        ep.split_template("A photo")
    assert answer_of(" wug.<|endofchunk|><image>") == "wug" and answer_of(" dax wug") == "dax wug"
    features = {"a": np.asarray([1.0, 0.0]), "b": np.asarray([0.0, 1.0]), "c": np.asarray([0.8, 0.6])}
    assert prototype_prediction(episode, {**features, "q": np.asarray([0.1, 0.99])}) == 1
    assert prototype_prediction(episode, {**features, "q": np.asarray([0.9, 0.3])}) == 0
    assert prototype_prediction(ep.Episode((), ep.Shot("q", "dax"), ("dax", "wug")), features) == -1


def test_iid_sequences_and_answerable_labels():
    """An 'iid' sequence draws each shot's class afresh (no label count tells the next one); a
    label is answerable once an earlier shot named it, or always when it is the real name."""
    collection = colours(per_class=12)
    follows = {True: [], False: []}  # next label equal to the more frequent one so far?
    for index in range(300):
        shots = ep.sample_sequence(collection, 2, 9, "novel", np.random.default_rng(index))
        images = [s.image for s in shots]
        assert len(shots) == 9 and len(set(images)) == 9 and len({s.label for s in shots}) <= 2
        assert not {s.label for s in shots} & set(COLOURS)
        by_label = {}
        for shot in shots:
            by_label.setdefault(shot.label, set()).add(class_of(collection.load(shot.image)))
        assert all(len(found) == 1 for found in by_label.values())
        counts = {}
        for position, shot in enumerate(shots):
            if position >= 4 and len(counts) == 2 and len(set(counts.values())) == 2:
                follows[True].append(shot.label == max(counts, key=counts.get))
            counts[shot.label] = counts.get(shot.label, 0) + 1
    # Balanced episodes favour the rarer label; iid sequences favour neither (about 50%).
    assert 0.42 < np.mean(follows[True]) < 0.58
    # Classes of 6 images: a 2-way sequence ends when both are used up.
    short = ep.sample_sequence(colours(per_class=6), 2, 16, "names", np.random.default_rng(0))
    assert len(short) == 12 and len({s.image for s in short}) == 12
    shots = [ep.Shot("a", "dax"), ep.Shot("b", "wug"), ep.Shot("c", "dax"), ep.Shot("d", "wug"), ep.Shot("e", "zib")]
    assert ep.answerable(shots, "novel") == [False, False, True, True, False]
    assert ep.answerable(shots, "names") == [True] * 5


def test_episode_documents_iid_answerable_and_template(tmp_path):
    """EpisodeDocuments with order='iid', loss='answerable' and a template: each record's texts
    read the template with their labels, and its text_weights mark the answerable ones; the
    converted example counts no target of an unanswerable text."""
    from flamingo_jax.data import records
    from flamingo_jax.data.images import ImageConfig

    builder = ep.EpisodeDocuments(
        source=str(tmp_path),
        collections={"test_colours": {}},
        ways=(2, 3),
        max_images=7,
        documents=30,
        order="iid",
        loss="answerable",
        template="It is {}!",
        flavours={"novel": 0.5, "names": 0.5},
        data_dir=str(tmp_path / "data"),
    )
    tokenizer = Tokenizer.from_bytes()
    converter = records.DocumentConverter(tokenizer, ImageConfig(image_size=16), 160, 7, 1.0, train=False)
    kinds = set()
    for _, record in builder._generate_examples():
        texts = json.loads(record["texts"])
        labels = [t.removeprefix("It is ").removesuffix("!") for t in texts]
        assert len(texts) == 7 and all(t == f"It is {label}!" for t, label in zip(texts, labels, strict=True))
        flavour = "names" if set(labels) <= set(COLOURS) else "novel"
        kinds.add(flavour)
        shots = [ep.Shot(str(i), label) for i, label in enumerate(labels)]
        assert record["text_weights"].tolist() == [float(k) for k in ep.answerable(shots, flavour)]
        example = converter(record, np.random.default_rng(0))
        tokens, mask = example["tokens"], example["loss_mask"]
        chunk = np.cumsum(tokens == tokenizer.media_token_id) - 1  # which text each token belongs to
        for t in range(len(tokens) - 1):
            if tokens[t + 1] not in (tokenizer.media_token_id, tokenizer.pad_id) and chunk[t + 1] >= 0:
                assert mask[t] == record["text_weights"][chunk[t + 1]]
    assert kinds == {"names", "novel"}
    with pytest.raises(ValueError, match="order='random'"):
        ep.EpisodeDocuments(source=str(tmp_path), collections={"test_colours": {}}, order="random")
    with pytest.raises(ValueError, match="exactly one"):
        ep.EpisodeDocuments(source=str(tmp_path), collections={"test_colours": {}}, template="no label")
