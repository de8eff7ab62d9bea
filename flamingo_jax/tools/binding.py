"""Where in-context binding happens, or fails: attention and cross-attention probes on few-shot
episodes, at the initialisation and at trained checkpoints.

  python -m flamingo_jax.tools.binding --gin_file=RUN.gin --workdir=DIR \\
      --task=binding_emoji_3way_novel [--shots=4] [--episodes=64] [--steps=0,320]

For each step (0: the initialisation; default: 0 and the latest checkpoint) it runs episodes of a
registered episodes task (``evaluation/episodic.py``) and reports, at the query's last position
(``...<image>A photo of a``, where the answer is predicted):

* **attention, per LM layer**: the attention mass on the demonstrations' tokens of the correct
  label minus the mean mass on another label's tokens, averaged over heads and for the layer's
  most selective head, and how often that head puts the most mass on the correct label. A layer
  whose heads do not prefer the correct label does not retrieve it.
* **cross-attention probe, per xattn block**: what the block adds to the residual stream at the
  query's last position, compared (cosine) with the mean of what it adds at each label's tokens
  in the demonstrations; the most similar label is the probe's answer. Near chance: the block
  does not write the image's identity where the LM could match it.
* **accuracy**: the model's ranked answers on the same episodes.

Writes ``DIR/eval/binding_<task>.json``. Needs per-layer (not scanned) LM layers.

  python -m flamingo_jax.tools.binding --gin_file=RUN.gin --workdir=DIR --lm_heads

instead scores every head of the frozen LM on random token sequences repeated twice (Olsson et
al. 2022, "In-context learning and induction heads"): its **induction** score (attention from a
token's second occurrence to the token after its first) and its **previous-token** score. The
LM's own binding circuit is a previous-token head feeding an induction head; an image can only
take part in it if a cross-attention block writes it into the stream below both (the demo's LM's
heads: docs/evaluation.md). Writes ``DIR/eval/binding_lm_heads.json``.

  python -m flamingo_jax.tools.binding --gin_file=RUN.gin --workdir=DIR --task=TASK --text_keys

scores the frozen LM alone on the task's episodes with each image replaced by a word naming its
class (an invented word per class and episode, ``"{key} {text}\\n"`` per shot): what the LM's
own copying does when the images are as distinct as tokens, an upper reference for what the
cross-attention blocks must write. Writes ``DIR/eval/binding_text_keys_<task>_<shots>shot.json``.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from flamingo_jax import configs, storage
from flamingo_jax.data import episodes as ep
from flamingo_jax.data.images import image_config_for
from flamingo_jax.evaluation.checkpoints import load_models
from flamingo_jax.evaluation.episodic import EpisodeImages, EpisodePrompt, EpisodeTask, candidate_rows, episode_prompt
from flamingo_jax.evaluation.fewshot import make_task
from flamingo_jax.evaluation.generate import batch_prompts
from flamingo_jax.evaluation.ranking import candidate_log_likelihoods
from flamingo_jax.tokenizer import load_tokenizer


def define_flags() -> None:
    """Command-line flags, defined only when run as a script (importing stays flag-free)."""
    flags.DEFINE_multi_string("gin_file", [], "The run's gin file(s).")
    flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings; also spelled --gin.KEY=VALUE.")
    flags.DEFINE_string("workdir", None, "The run's directory (its checkpoints).")
    flags.DEFINE_string("task", None, "A registered episodes task, e.g. binding_emoji_3way_novel.")
    flags.DEFINE_integer("shots", 4, "Demonstrations per class.")
    flags.DEFINE_integer("episodes", 64, "Episodes to diagnose.")
    flags.DEFINE_integer("batch_size", 8, "Episodes per forward pass.")
    flags.DEFINE_list("steps", [], "Checkpoint steps (0: the initialisation); default 0 and the latest.")
    flags.DEFINE_bool("lm_heads", False, "Score the frozen LM's induction and previous-token heads instead.")
    flags.DEFINE_bool("text_keys", False, "Score the frozen LM on the episodes with words in place of the images.")


def set_capture(model, on: bool) -> None:
    """Switches the sowing of the LM's last-position attention and the xattn blocks' outputs."""
    if model.config.lm.scan_layers:
        raise ValueError("tools.binding needs per-layer LM layers (LlamaConfig.scan_layers = False)")
    for layer in model.lm.layers:
        layer.attention.capture_attention = on
    for block in model.xattn_layers:
        block.capture_output = on


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _captured(graphdef, state, tokens, input_mask, image_index, image_mask, images):
    model = nnx.merge(graphdef, state)
    model(tokens, image_index, image_mask, images, input_mask=input_mask, last_only=True)
    return nnx.pop(model, nnx.Intermediate).to_pure_dict()


def _by_index(tree: dict, leaf: str) -> list[np.ndarray]:
    """The sown ``leaf`` arrays of a captured tree, ordered by the numeric index in their path."""
    found = []
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if leaf in keys:
            index = next(int(k) for k in keys if isinstance(k, int) or (isinstance(k, str) and k.isdigit()))
            found.append((index, np.asarray(value)))
    return [value for _, value in sorted(found, key=lambda item: item[0])]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _lm_captured(graphdef, state, tokens):
    lm = nnx.merge(graphdef, state)
    lm.backbone(lm.embed_tokens(tokens))
    return nnx.pop(lm, nnx.Intermediate).to_pure_dict()


def lm_head_scores(lm, *, sequences: int = 32, length: int = 40, cuts=(25, 28, 31, 34, 37), seed: int = 0) -> dict:
    """Per LM layer, per head: the **induction** score (attention from the last position, a
    token's second occurrence, to the token that followed its first) and the **previous-token**
    score (attention to the position before), averaged over ``sequences`` random token sequences
    of ``length`` repeated up to each of ``cuts``. {'induction': float[L, H], 'previous_token':
    float[L, H]} as nested lists. ``lm``: a per-layer (not scanned) ``LlamaLM``."""
    config = lm.config
    if config.scan_layers:
        raise ValueError("tools.binding needs per-layer LM layers (LlamaConfig.scan_layers = False)")
    rng = np.random.default_rng(seed)
    random_tokens = rng.integers(config.vocab_size // 20, config.vocab_size, (sequences, length))
    induction = np.zeros((config.num_layers, config.num_heads))
    previous = np.zeros_like(induction)
    for layer in lm.layers:
        layer.attention.capture_attention = True
    try:
        graphdef, state = nnx.split(lm)
        for cut in cuts:
            tokens = np.concatenate([random_tokens, random_tokens[:, :cut]], axis=1)  # last: token cut - 1 again
            tree = _lm_captured(graphdef, state, tokens.astype(np.int32))
            for layer, weights in enumerate(_by_index(tree, "last_attention")):
                heads = weights.reshape(sequences, config.num_heads, -1)  # [B, H, S]
                induction[layer] += heads[:, :, cut].mean(axis=0) / len(cuts)
                previous[layer] += heads[:, :, -2].mean(axis=0) / len(cuts)
    finally:
        for layer in lm.layers:
            layer.attention.capture_attention = False
    return {"induction": induction.round(4).tolist(), "previous_token": previous.round(4).tolist()}


def format_lm_heads(scores: dict, top: int = 8) -> str:
    lines = []
    for kind in ("induction", "previous_token"):
        values = np.asarray(scores[kind])
        order = np.argsort(values, axis=None)[::-1][:top]
        best = ", ".join(
            f"{layer}.{head} {values[layer, head]:.2f}"
            for layer, head in zip(*np.unravel_index(order, values.shape), strict=True)
        )
        lines.append(f"{kind} heads (layer.head score): {best}")
    return "\n".join(lines)


def text_key_prompt(tokenizer, episode, template: str, rng: np.random.Generator) -> EpisodePrompt:
    """The episode as text alone: each image replaced by an invented word naming its class in
    this episode (never one of its labels), each shot ``"{key} {text}\\n"``, the query's text
    up to its label. ``label_positions`` is empty."""
    head, _ = ep.split_template(template)
    keys = dict(zip(episode.candidates, ep.episode_labels("novel", episode.candidates, rng), strict=True))
    lines = "".join(f"{keys[d.label]} {template.format(d.label)}\n" for d in episode.demos)
    key = keys[episode.query.label]
    tokens = tokenizer.encode(lines + f"{key} {head}".rstrip())
    candidates = []
    for label in episode.candidates:
        full = tokenizer.encode(lines + f"{key} {template.format(label)}")
        if full[: len(tokens)] != tokens:
            raise ValueError(f"episode {episode.id!r}: the candidate {label!r} does not continue the prompt's tokens")
        candidates.append(full[len(tokens) :])
    return EpisodePrompt(tokens, candidates, {})


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _lm_target_log_probs(graphdef, state, tokens, positions, targets):
    lm = nnx.merge(graphdef, state)
    hidden, _ = lm.backbone(lm.embed_tokens(tokens))
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [R, L, W]: only where a target is read
    log_probs = jax.nn.log_softmax(lm.logits(picked), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def lm_candidate_scores(lm, prompts: list[EpisodePrompt], *, multiple: int = 32) -> np.ndarray:
    """float[E, C]: log p(candidate | prompt) under the LM alone (text prompts, no images),
    each prompt with each of its candidates one right-padded row; the logits are computed only
    at the positions that predict a candidate's tokens."""
    rows = [(p.tokens, c) for p in prompts for c in p.candidates]
    length = -(-max(len(t) + len(c) for t, c in rows) // multiple) * multiple
    width = max(len(c) for _, c in rows)
    tokens = np.zeros((len(rows), length), np.int32)
    positions = np.zeros((len(rows), width), np.int32)
    targets = np.zeros((len(rows), width), np.int32)
    valid = np.zeros((len(rows), width), bool)
    for row, (prompt, candidate) in enumerate(rows):
        tokens[row, : len(prompt) + len(candidate)] = [*prompt, *candidate]
        positions[row, : len(candidate)] = np.arange(len(candidate)) + len(prompt) - 1
        targets[row, : len(candidate)], valid[row, : len(candidate)] = candidate, True
    graphdef, state = nnx.split(lm)
    picked = np.asarray(_lm_target_log_probs(graphdef, state, *(jnp.asarray(a) for a in (tokens, positions, targets))))
    return np.where(valid, picked, 0.0).sum(axis=1, dtype=np.float64).reshape(len(prompts), -1)


def text_key_accuracy(lm, tokenizer, task: EpisodeTask, *, shots: int, episodes: int, batch_size: int) -> dict:
    """The frozen LM's ranked accuracy on ``episodes`` of ``task`` at ``shots`` with words for
    the images (:func:`text_key_prompt`), with its standard error."""
    chosen = task.episodes(shots, 0, shots)[:episodes]
    if not chosen:
        raise ValueError(f"task {task.name!r}: no episodes at {shots} shots")
    rng = np.random.default_rng(0)
    prompts = [text_key_prompt(tokenizer, e, task.template, rng) for e in chosen]
    correct = []
    for start in range(0, len(chosen), batch_size):
        scores = lm_candidate_scores(lm, prompts[start : start + batch_size])
        correct += [
            int(np.argmax(s)) == e.answer for s, e in zip(scores, chosen[start : start + batch_size], strict=True)
        ]
    accuracy = float(np.mean(correct))
    return {
        "episodes": len(chosen),
        "shots": shots,
        "ways": len(chosen[0].candidates),
        "accuracy": accuracy,
        "accuracy_se": float(np.sqrt(accuracy * (1 - accuracy) / len(chosen))),
    }


def diagnose(model, tokenizer, task: EpisodeTask, image_config, *, shots: int, episodes: int, batch_size: int) -> dict:
    """The attention and probe statistics (see the module docstring) of ``episodes`` episodes."""
    chosen = task.episodes(shots, 0, shots)[:episodes]
    if not chosen or any(not e.demos for e in chosen):
        raise ValueError(f"task {task.name!r}: no episodes with demonstrations at {shots} shots")
    image = EpisodeImages(task.collections, image_config)
    attention_rows, probe_rows, correct = [], [], []
    set_capture(model, True)
    try:
        graphdef, state = nnx.split(model)
        for start in range(0, len(chosen), batch_size):
            batch = chosen[start : start + batch_size]
            prompts = [episode_prompt(tokenizer, e, task.template) for e in batch]
            pictures = [[image(s.image) for s in (*e.demos, e.query)] for e in batch]
            tokens, mask, index, media, image_mask = batch_prompts(
                [p.tokens for p in prompts], pictures, tokenizer.media_token_id, tokenizer.pad_id, batch_size, 16
            )
            tree = _captured(graphdef, state, tokens, mask, index, image_mask, media)
            attention = _by_index(tree, "last_attention")  # per LM layer: [B, K, G, S]
            deltas = _by_index(tree, "delta")  # per xattn block: [B, T, W]
            candidates = candidate_rows(prompts, len(tokens))
            scores = candidate_log_likelihoods(model, tokens, index, image_mask, media, candidates, input_mask=mask)
            for row, (episode, prompt) in enumerate(zip(batch, prompts, strict=True)):
                pad = tokens.shape[1] - len(prompt.tokens)
                spans = [np.asarray(prompt.label_positions[c]) + pad for c in episode.candidates]
                answer = episode.answer
                per_layer = []
                for weights in attention:
                    heads = weights[row].reshape(-1, weights.shape[-1])  # [H, S]
                    mass = np.stack([heads[:, span].sum(axis=1) for span in spans], axis=1)  # [H, C]
                    others = np.delete(mass, answer, axis=1)
                    per_layer.append((mass[:, answer] - others.mean(axis=1), mass[:, answer] > others.max(axis=1)))
                attention_rows.append(per_layer)
                per_block = []
                for delta in deltas:
                    query = delta[row, -1]
                    means = np.stack([delta[row, span].mean(axis=0) for span in spans])
                    similarity = (
                        means @ query / np.maximum(np.linalg.norm(means, axis=1) * np.linalg.norm(query), 1e-12)
                    )
                    per_block.append(int(np.argmax(similarity)) == answer)
                probe_rows.append(per_block)
                correct.append(int(np.argmax(scores[row])) == answer)
    finally:
        set_capture(model, False)
    layers = []
    for layer in range(len(attention_rows[0])):
        margin = np.stack([r[layer][0] for r in attention_rows])  # [E, H]
        wins = np.stack([r[layer][1] for r in attention_rows])
        best = int(np.argmax(margin.mean(axis=0)))
        layers.append(
            {
                "layer": layer,
                "mean_margin": float(margin.mean()),
                "best_head": best,
                "best_head_margin": float(margin[:, best].mean()),
                "best_head_correct": float(wins[:, best].mean()),
            }
        )
    xattn_layers = list(model.config.xattn_layer_indices)
    probes = [
        {"block": b, "lm_layer": int(xattn_layers[b]), "probe_accuracy": float(np.mean([r[b] for r in probe_rows]))}
        for b in range(len(probe_rows[0]))
    ]
    return {
        "episodes": len(chosen),
        "shots": shots,
        "ways": len(chosen[0].candidates),
        "accuracy": float(np.mean(correct)),
        "attention": layers,
        "xattn_probe": probes,
    }


def format_results(results: dict) -> str:
    lines = []
    for step, r in results.items():
        chance = 100 / r["ways"]
        lines.append(
            f"step {step}: {r['ways']}-way {r['shots']}-shot, {r['episodes']} episodes, accuracy "
            f"{100 * r['accuracy']:.1f}% (chance {chance:.1f}%)"
        )
        lines.append("  layer  mean margin  best head: margin  correct-first")
        for a in r["attention"]:
            lines.append(
                f"  {a['layer']:>5}  {a['mean_margin']:>11.4f}  {a['best_head']:>9}: {a['best_head_margin']:.4f}"
                f"  {100 * a['best_head_correct']:>12.1f}%"
            )
        lines.append("  xattn block (before LM layer): probe accuracy")
        lines += [f"  {p['block']:>5} ({p['lm_layer']:>2}): {100 * p['probe_accuracy']:.1f}%" for p in r["xattn_probe"]]
    return "\n".join(lines)


def episode_task(name: str, eval_config) -> EpisodeTask:
    """The registered task ``name``, which must be an episodes task."""
    task = make_task(name, eval_config)
    if not isinstance(task, EpisodeTask):
        raise ValueError(f"task {name!r} is not an episodes task")
    return task


def binding_run(run_config, eval_config, workdir: str, steps, *, task: str, **options) -> dict:
    """{step: diagnose(...)} for each of ``steps`` (None: the latest checkpoint)."""
    built = episode_task(task, eval_config)
    tokenizer = load_tokenizer(run_config.tokenizer)
    image_config = image_config_for(run_config.model.vision)
    return {
        step: diagnose(model, tokenizer, built, image_config, **options)
        for model, step, _, _ in load_models(run_config, workdir, steps)
    }


def main(argv) -> None:
    args = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"binding: unexpected arguments {argv[1:]}")
    if not (args.gin_file and args.workdir and (args.task or args.lm_heads)):
        sys.exit("binding: --gin_file, --workdir and --task (or --lm_heads) are required")
    try:
        steps = [int(s) for s in args.steps] if args.steps else [0, None]
    except ValueError:
        sys.exit(f"binding: --steps must be integers, got {args.steps}")
    configs.parse_gin(args.gin_file, args.gin_bindings)
    if args.lm_heads:
        model = next(load_models(configs.run_config(), args.workdir, [0]))[0]
        scores = lm_head_scores(model.lm)
        print(format_lm_heads(scores))
        if jax.process_index() == 0:
            storage.write_text(storage.path(args.workdir) / "eval" / "binding_lm_heads.json", json.dumps(scores))
        return
    if args.text_keys:
        try:
            run_config = configs.run_config()
            task = episode_task(args.task, configs.eval_config())
            model = next(load_models(run_config, args.workdir, [0]))[0]
            options = dict(shots=args.shots, episodes=args.episodes, batch_size=args.batch_size)
            result = text_key_accuracy(model.lm, load_tokenizer(run_config.tokenizer), task, **options)
        except (ValueError, FileNotFoundError) as error:
            sys.exit(f"binding: {error}")
        print(
            f"text keys, frozen LM: {result['ways']}-way {result['shots']}-shot, {result['episodes']} episodes, "
            f"accuracy {100 * result['accuracy']:.1f} ± {100 * result['accuracy_se']:.1f}%"
        )
        if jax.process_index() == 0:
            path = storage.path(args.workdir) / "eval" / f"binding_text_keys_{args.task}_{args.shots}shot.json"
            storage.write_text(path, json.dumps(result))
        return
    try:
        results = binding_run(
            configs.run_config(),
            configs.eval_config(),
            args.workdir,
            steps,
            task=args.task,
            shots=args.shots,
            episodes=args.episodes,
            batch_size=args.batch_size,
        )
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"binding: {error}")
    print(format_results(results))
    if jax.process_index() == 0:
        path = storage.path(args.workdir) / "eval" / f"binding_{args.task}.json"
        storage.write_text(path, json.dumps({str(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main, argv=configs.rewrite_gin_args(sys.argv))
