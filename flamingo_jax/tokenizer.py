"""Tokenizers behind one interface: sentencepiece models, Hugging Face ``tokenizer.json`` files
and the byte-level BPE stored in GGUF metadata.

``<image>`` and ``<|endofchunk|>`` are added after the base vocabulary, with ids
``base_vocab_size`` and ``base_vocab_size + 1``: the ids of the model's new embedding rows
(:class:`flamingo_jax.models.flamingo.FlamingoConfig`). Padding side and BOS/EOS are explicit.
"""

from __future__ import annotations

import copy
import functools
import os
import re

import numpy as np

from flamingo_jax.batch import NEW_TOKENS
from flamingo_jax.importers.weights import weights_path

# How GGUF ``tokenizer.ggml.pre`` types split text before BPE (llama.cpp's pre-tokenizer regexes).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_SPLITS = {
    "default": [_GPT2_SPLIT],
    "gpt-2": [_GPT2_SPLIT],
    # SmolLM's tokenizer splits every digit on its own first (its tokenizer.json: Digits, then
    # byte-level); llama.cpp's 'smollm' pre-tokenizer does the same.
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
}


class Tokenizer:
    """Text <-> int32 ids of the base vocabulary plus the two Flamingo tokens."""

    def __init__(
        self, encode_fn, decode_fn, base_vocab_size: int, *, bos_id=None, eos_id=None, pad_id=None, end_ids=()
    ):
        self._encode = encode_fn
        self._decode = decode_fn
        self.base_vocab_size = base_vocab_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self._end_ids = tuple(end_ids)
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.media_token_id = base_vocab_size
        self.endofchunk_token_id = base_vocab_size + 1
        self._name_new_tokens(NEW_TOKENS)

    def _name_new_tokens(self, names) -> None:
        self.new_tokens = tuple(names)
        self._specials = dict(zip(self.new_tokens, (self.media_token_id, self.endofchunk_token_id), strict=True))
        self._special_pattern = re.compile("(" + "|".join(re.escape(t) for t in self.new_tokens) + ")")

    def with_new_tokens(self, names: tuple[str, str]) -> Tokenizer:
        """This tokenizer with ``names`` as the texts of the two new tokens (``FlamingoConfig.new_tokens``:
        IDEFICS's second row is ``<fake_token_around_image>``, not ``<|endofchunk|>``)."""
        if tuple(names) == self.new_tokens:
            return self
        renamed = copy.copy(self)
        renamed._name_new_tokens(names)
        return renamed

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus ``<image>`` and ``<|endofchunk|>``."""
        return self.base_vocab_size + len(NEW_TOKENS)

    @property
    def end_token_ids(self) -> tuple[int, ...]:
        """Every token that ends a generated answer: ``<|endofchunk|>``, the EOS and any other
        end-of-turn token the tokenizer declares (e.g. a chat model's ``<|im_end|>``)."""
        ids = (self.endofchunk_token_id, self.eos_id, *self._end_ids)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def cut_at_end(self, ids) -> list[int]:
        """``ids`` up to (without) the first of :attr:`end_token_ids`: the answer that is scored
        and shown, without the token that ended it."""
        ids = [int(i) for i in ids]
        ends = set(self.end_token_ids)
        return next((ids[:position] for position, token in enumerate(ids) if token in ends), ids)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of ``text``; the literal strings of the two new tokens (``<image>`` /
        ``<|endofchunk|>`` unless renamed) become their tokens."""
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        for piece in self._special_pattern.split(text):
            if piece in self._specials:
                ids.append(self._specials[piece])
            elif piece:
                ids.extend(self._encode(piece))
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """Text of ``ids``; the Flamingo tokens come back as their strings unless skipped."""
        inverse = {value: key for key, value in self._specials.items()}
        pieces, run = [], []
        for token in (int(i) for i in ids):
            if token in inverse:
                if run:
                    pieces.append(self._decode(run))
                    run = []
                if not skip_special:
                    pieces.append(inverse[token])
            else:
                run.append(token)
        if run:
            pieces.append(self._decode(run))
        return "".join(pieces)

    def encode_batch(self, texts, length: int, *, padding_side: str = "right", add_bos: bool = False):
        """int32[B, length] ids and bool[B, length] mask; too-long texts are truncated at the end."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tokens = np.full((len(texts), length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), length), bool)
        for row, text in enumerate(texts):
            ids = self.encode(text, add_bos=add_bos)[:length]
            start = length - len(ids) if padding_side == "left" else 0
            tokens[row, start : start + len(ids)] = ids
            mask[row, start : start + len(ids)] = True
        return tokens, mask

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def from_bytes(cls) -> Tokenizer:
        """UTF-8 bytes as ids 3..258 (0 pad, 1 BOS, 2 EOS): needs no file; for tests and
        generated data."""

        def decode(ids):
            return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", "replace")

        return cls(lambda text: [b + 3 for b in text.encode("utf-8")], decode, 259, bos_id=1, eos_id=2, pad_id=0)

    @classmethod
    def from_sentencepiece(cls, path: str) -> Tokenizer:
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=path)

        def optional(value):
            return None if value < 0 else value

        return cls(
            lambda text: processor.encode(text),
            lambda ids: processor.decode(ids),
            processor.get_piece_size(),
            bos_id=optional(processor.bos_id()),
            eos_id=optional(processor.eos_id()),
            pad_id=optional(processor.pad_id()),
        )

    @classmethod
    def from_tokenizers(cls, backend, *, bos_token=None, eos_token=None, pad_token=None, end_tokens=()) -> Tokenizer:
        """From a ``tokenizers.Tokenizer``; its size (with its own added tokens) is the base vocab.
        ``end_tokens``: further tokens that end a generation (end of turn)."""
        backend.no_padding()
        backend.no_truncation()

        def token_id(token):
            return None if token is None else backend.token_to_id(token)

        return cls(
            lambda text: backend.encode(text, add_special_tokens=False).ids,
            lambda ids: backend.decode(ids, skip_special_tokens=False),
            backend.get_vocab_size(with_added_tokens=True),
            bos_id=token_id(bos_token),
            eos_id=token_id(eos_token),
            pad_id=token_id(pad_token),
            end_ids=[token_id(token) for token in end_tokens if token_id(token) is not None],
        )

    @classmethod
    def from_hf_json(cls, path: str, *, bos_token=None, eos_token=None, pad_token=None) -> Tokenizer:
        import tokenizers

        return cls.from_tokenizers(
            tokenizers.Tokenizer.from_file(path), bos_token=bos_token, eos_token=eos_token, pad_token=pad_token
        )

    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        """The byte-level BPE tokenizer stored in a GGUF file's metadata."""
        import gguf
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        reader = gguf.GGUFReader(path)

        def field(name, default=None):
            return reader.fields[name].contents() if name in reader.fields else default

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is read from GGUF"
            )
        tokens = field("tokenizer.ggml.tokens")
        merges = [tuple(merge.split(" ", 1)) for merge in field("tokenizer.ggml.merges")]
        pre = field("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_SPLITS:
            raise ValueError(f"{path}: unknown pre-tokenizer {pre!r}; known: {sorted(GGUF_PRE_SPLITS)}")
        backend = Backend(models.BPE({token: index for index, token in enumerate(tokens)}, merges))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in GGUF_PRE_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        types = field("tokenizer.ggml.token_type") or []
        control = [token for token, kind in zip(tokens, types, strict=False) if kind == 3]  # CONTROL
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])

        def special(name):
            value = field(f"tokenizer.ggml.{name}_token_id")
            return None if value is None else tokens[int(value)]

        return cls.from_tokenizers(
            backend,
            bos_token=special("bos"),
            eos_token=special("eos"),
            pad_token=special("padding"),
            end_tokens=[token for token in (special("eot"), special("eom")) if token is not None],
        )


def load_tokenizer(spec: str, new_tokens: tuple[str, str] = NEW_TOKENS) -> Tokenizer:
    """``'bytes'``, ``'gguf:PATH'``, ``'sentencepiece:PATH'`` or ``'hf_json:PATH'``; PATH may be a
    name registered in ``importers.weights.WEIGHTS`` (e.g. a GGUF whose metadata holds the
    tokenizer), and a registered GGUF name alone means ``'gguf:NAME'``. ``new_tokens``: the
    texts of the two tokens after the base vocabulary (the model's ``FlamingoConfig.new_tokens``)."""
    return _load_tokenizer(spec).with_new_tokens(new_tokens)


def _load_tokenizer(spec: str) -> Tokenizer:
    if spec == "bytes":
        return Tokenizer.from_bytes()
    kind, _, path = spec.partition(":")
    loaders = {
        "gguf": Tokenizer.from_gguf,
        "sentencepiece": Tokenizer.from_sentencepiece,
        "hf_json": Tokenizer.from_hf_json,
    }
    if not path and weights_path(spec).endswith(".gguf"):
        kind, path = "gguf", spec
    if kind not in loaders or not path:
        raise ValueError(
            f"tokenizer {spec!r}: use 'bytes', a registered GGUF weights name or one of "
            f"{[k + ':PATH' for k in loaders]}"
        )
    resolved = weights_path(path)
    return _read_tokenizer(loaders[kind], resolved, os.path.getmtime(resolved) if os.path.exists(resolved) else None)


@functools.lru_cache(maxsize=8)
def _read_tokenizer(loader, path: str, mtime: float | None) -> Tokenizer:
    """A tokenizer file read once per process (a 49k-token GGUF takes 3-4 s): a file rewritten since
    (another ``mtime``) is read again. Tokenizers are not changed after they are built
    (``with_new_tokens`` copies)."""
    del mtime  # part of the cache key only
    return loader(path)
