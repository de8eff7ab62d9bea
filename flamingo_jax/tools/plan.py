"""Pod-scale planner: per-device memory, FLOPs, collectives and projected step time of a run's
train step on a TPU topology, from an ahead-of-time compile on fake CPU devices.

  python -m flamingo_jax.tools.plan --gin_file=runs/flamingo_80b.gin --topology=v5p-512

Nothing is allocated: the train state and the batches are ``ShapeDtypeStruct`` s carrying the
mesh's shardings, and ``jit(...).lower(...).compile()`` runs XLA's SPMD partitioner for the
topology's chip count. Parameter, optimizer-state and batch bytes per device are exact (from the
shardings); temporaries (activations kept for the backward pass, gradients, workspace) come from
XLA's memory analysis of the compiled step. A full-depth compile of a 70B LM takes too long on a
laptop, so by default the step is compiled at one and two "periods" of the LM (``every`` layers
and one xattn block each) and the per-period growth is extrapolated linearly to the full depth;
the output says which. A scanned model (``LlamaConfig.scan_layers``) compiles at full depth in
about one period's time; XLA's analyses count a loop body once, so the planner counts the loop's
collectives and matmul FLOPs once per trip from the compiled HLO (:func:`collectives_in`,
:func:`uncounted_loop_flops`), remat recompute included.

Caveats (printed with the table): XLA's CPU backend, not the TPU one, schedules and fuses the
program, so the temporaries are an estimate (it runs bf16 matmuls in fp32; layouts and fusion
differ); the projected step time assumes the chip's peak bf16 FLOP/s and collectives (the bytes
each chip sends in ring algorithms) at the chip's ICI bandwidth, after the compute or hidden
under it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time

import jax
import numpy as np
from absl import app, flags

from flamingo_jax import configs, sharding
from flamingo_jax.batch import Batch
from flamingo_jax.data.sources import SOURCES
from flamingo_jax.models.kinds import kind_of
from flamingo_jax.train.optimizer import make_optimizer
from flamingo_jax.train.params import flat_shardings, logical_names, model_graphdef
from flamingo_jax.train.step import TrainState, jit_train_step, train_state_shardings


def define_flags() -> None:
    """Command-line flags, defined only when run as a script (importing stays flag-free)."""
    flags.DEFINE_multi_string("gin_file", [], "Run gin file(s); searched in experiments/ too.")
    flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings; also spelled --gin.KEY=VALUE.")
    flags.DEFINE_string("topology", "v5p-256", "TPU topology, e.g. v5p-512, v4-128, v5e-256, v6e-64.")
    flags.DEFINE_enum(
        "depth", "auto", ["auto", "full", "extrapolate"], "Compile the full depth, or two short depths and extrapolate."
    )
    flags.DEFINE_string("output", None, "Also write the plan as JSON here.")


GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM, peak dense bf16 FLOP/s and inter-chip bandwidth per chip (Cloud
    TPU documentation), and how many cores the topology name counts per chip."""

    name: str
    hbm_bytes: float
    peak_flops: float
    ici_bytes_per_s: float
    cores_per_chip: int


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 2400e9 / 8, 2),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 4800e9 / 8, 2),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 1600e9 / 8, 1),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 3584e9 / 8, 1),
}
CHIPS["v5litepod"] = CHIPS["v5e"]


def parse_topology(topology: str) -> tuple[Chip, int]:
    """'v5p-256' -> (the v5p chip, 128 chips): v4 and v5p names count TensorCores (2 per chip)."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", topology)
    if not match:
        raise ValueError(f"unknown topology {topology!r}; expected e.g. v5p-256, v4-128, v5e-64, v6e-256")
    chip = CHIPS[match.group(1)]
    cores = int(match.group(2))
    if cores % chip.cores_per_chip:
        raise ValueError(f"topology {topology!r}: {cores} is not a whole number of {chip.name} chips")
    return chip, cores // chip.cores_per_chip


# ----------------------------------------------------------------------------------------------
# Abstract inputs of the step.
# ----------------------------------------------------------------------------------------------


def batch_shapes(dataset, model_config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Field -> (shape, dtype) of one dataset's global batch, as the data pipeline produces it."""
    if dataset.source == "synthetic":
        num_media, num_frames = dataset.synthetic.num_media, 1
        size, length = dataset.synthetic.image_size, dataset.synthetic.length
    else:
        kind = SOURCES[dataset.source].kind
        num_media = dataset.max_images if kind == "documents" else 1
        num_frames = dataset.num_frames if kind == "video" else 1
        size, length = model_config.vision.image_size, dataset.length
    batch = dataset.batch_size
    return {
        "tokens": ((batch, length), np.dtype(np.int32)),
        "images": ((batch, num_media, num_frames, size, size, 3), np.dtype(np.float32)),
        "image_mask": ((batch, num_media), np.dtype(bool)),
        "image_index": ((batch, length), np.dtype(np.int32)),
        "loss_mask": ((batch, length), np.dtype(np.float32)),
    }


def abstract_batches(run_config, mesh, rules) -> dict[str, Batch]:
    out = {}
    for dataset in run_config.datasets:
        fields = {
            key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, rules, len(shape)))
            for key, (shape, dtype) in batch_shapes(dataset, run_config.model).items()
        }
        out[dataset.name] = Batch.from_dict(fields)
    return out


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class Compiled:
    """What one AOT compile of the step reports (bytes and FLOPs per device)."""

    num_layers: int
    num_blocks: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float
    collectives: dict[str, dict[str, float]]
    compile_s: float


_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|\S+)\s+(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
_ARRAY = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
_ITEMSIZE.update({"s64": 8, "u64": 8, "f64": 8})


_COMMENT = re.compile(r"/\*.*?\*/")
_HEADER = re.compile(r"^(ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*->.*\{\s*$")
_WHILE_BODY = re.compile(r"\bwhile\(.*\bbody=%?(?P<body>[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"')
_CALLED = re.compile(
    r"\b(?:calls|to_apply|body|condition|branch_computations|called_computations)="
    r"(?:\{(?P<several>[^}]*)\}|%?(?P<one>[\w.\-]+))"
)


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """({computation name: its instruction lines}, the entry's name) of HLO text; lines outside
    any computation (a bare snippet) go to the entry ''."""
    computations: dict[str, list[str]] = {"": []}
    entry, current = None, ""
    for line in hlo_text.splitlines():
        header = _HEADER.match(line.strip())
        if header:
            current = header.group("name")
            computations[current] = []
            entry = current if header.group(1) else entry
        elif line.strip() == "}":
            current = ""
        else:
            # Comments (the /*index=N*/ in long tuple shapes) would cut a shape short.
            computations[current].append(_COMMENT.sub("", line))
    return computations, entry


def computation_runs(hlo_text: str) -> dict[str, float]:
    """{computation name: how many times one run of the program runs it}: a while loop's body
    runs its ``known_trip_count`` times per run of the computation holding the loop (XLA's
    analyses count it once), anything else it calls once."""
    return _runs(*_computations(hlo_text))


def _runs(computations: dict[str, list[str]], entry: str | None, trips: bool = True) -> dict[str, float]:
    """:func:`computation_runs` of already split HLO text (``trips=False``: loop bodies once, as
    XLA's analyses count them)."""
    runs = {name: 0.0 for name in computations}
    runs[""] = 1.0

    def visit(name: str, times: float, depth: int = 0) -> None:
        if name not in computations or depth > 64:
            return
        runs[name] += times
        for line in computations[name]:
            body = _WHILE_BODY.search(line)
            count = _TRIP_COUNT.search(line)
            loop_body = body.group("body") if body else None
            for called in _CALLED.finditer(line):
                for callee in (called.group("several") or called.group("one")).split(","):
                    callee = callee.strip().lstrip("%")
                    factor = int(count.group("n")) if callee == loop_body and count and trips else 1
                    visit(callee, times * factor, depth + 1)

    if entry is not None:
        visit(entry, 1.0)
    return runs


_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\([^=]*?\)|\S+)\s+(?P<op>[\w\-]+)\(")
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{(?P<dims>[\d,]*)\}")


def _dims(shape: str) -> list[int]:
    match = _ARRAY.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def dot_flops(lines: list[str]) -> float:
    """FLOPs of the matmuls (``dot``) among one computation's HLO lines: 2 x result elements x
    contracted size (the left operand's shape from its definition in the same computation)."""
    return _dot_flops(_instructions(lines)[0])


def _dot_flops(instructions: dict[str, _Instruction]) -> float:
    """:func:`dot_flops` of one computation's parsed instructions."""
    total = 0.0
    for instruction in instructions.values():
        if instruction.op != "dot" or not instruction.operands:
            continue
        lhs_definition = instructions.get(instruction.operands[0])
        lhs = _dims(lhs_definition.shape) if lhs_definition else []
        contracting = _LHS_CONTRACTING.search(instruction.line)
        size = math.prod(lhs[int(d)] for d in contracting.group("dims").split(",") if d) if contracting else 1
        total += 2.0 * math.prod(_dims(instruction.shape)) * size
    return total


def uncounted_loop_flops(hlo_text: str) -> float:
    """The matmul FLOPs XLA's cost analysis leaves out of a program with loops: it counts a loop
    body once per run of the computation holding the loop, while the body runs its trip count."""
    return _Program(hlo_text).uncounted_loop_flops()


_OPERANDS = re.compile(r"%(?P<name>[\w.\-]+)")
_INDEX = re.compile(r"\bindex=(\d+)")
_PARAMETER = re.compile(r"\bparameter\((\d+)\)")
_CALLS = re.compile(r"\bcalls=%(?P<callee>[\w.\-]+)")
# Ops that pass values on unchanged (a convert seen through them is the value's precision).
_MOVES = {"bitcast", "reshape", "copy", "transpose", "dynamic-slice", "slice", "broadcast"}


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shape: str
    op: str
    operands: tuple[str, ...]
    line: str


def _instructions(lines: list[str]) -> tuple[dict[str, _Instruction], str | None]:
    """{name: instruction} of one computation's HLO lines, and the ROOT instruction's name."""
    found, root = {}, None
    for line in lines:
        definition = _DEFINITION.match(line)
        if not definition:
            continue
        rest = line[definition.end() :]
        arguments = rest[: rest.find(")")] if ")" in rest else rest
        operands = tuple(match.group("name") for match in _OPERANDS.finditer(arguments))
        instruction = _Instruction(
            definition.group("name"), definition.group("shape"), definition.group("op"), operands, line
        )
        found[instruction.name] = instruction
        if line.lstrip().startswith("ROOT"):
            root = instruction.name
    return found, root


def _number(pattern: re.Pattern, line: str) -> int | None:
    """The integer ``pattern``'s first group finds in ``line`` (a parameter or tuple index)."""
    match = pattern.search(line)
    return int(match.group(1)) if match else None


def _is_bf16(shape: str) -> bool:
    return shape.startswith("bf16[")


class _Program:
    """Compiled HLO text split into computations, with what each instruction is and uses."""

    def __init__(self, hlo_text: str):
        self.computations, self.entry = _computations(hlo_text)
        parsed = {name: _instructions(lines) for name, lines in self.computations.items()}
        self.instructions = {name: instructions for name, (instructions, _) in parsed.items()}
        self.roots = {name: root for name, (_, root) in parsed.items()}
        self.runs = _runs(self.computations, self.entry)
        self._users_of: dict[str, dict[str, list[_Instruction]]] = {}

    def uncounted_loop_flops(self) -> float:
        """:func:`uncounted_loop_flops` of this program."""
        counted = _runs(self.computations, self.entry, trips=False)
        return sum(
            (self.runs[name] - counted[name]) * _dot_flops(instructions)
            for name, instructions in self.instructions.items()
        )

    def collectives(self) -> dict[str, dict[str, float]]:
        """:func:`collectives_in` of this program."""
        found: dict[str, dict[str, float]] = {}
        for name, instructions in self.instructions.items():
            for instruction in instructions.values():
                match = _COLLECTIVE.search(instruction.line)
                if not match:
                    continue
                arrays = _ARRAY.findall(match.group("shape"))
                elements = [math.prod(int(d) for d in dims.split(",") if d) for _, dims in arrays]
                compiled = sum(_ITEMSIZE[dtype] * count for (dtype, _), count in zip(arrays, elements, strict=True))
                sizes = self.tpu_itemsizes(name, instruction)
                moved = sum(size * count for size, count in zip(sizes, elements, strict=True))
                op = match.group("op")
                entry = found.setdefault(op, {"count": 0, "bytes": 0.0, "compiled_bytes": 0.0, "sent": 0.0})
                runs = self.runs[name]
                entry["count"] += runs
                entry["bytes"] += runs * moved
                entry["compiled_bytes"] += runs * compiled
                entry["sent"] += runs * sent_per_device(op, moved, group_size(instruction.line))
        return found

    def _users(self, computation: str) -> dict[str, list[_Instruction]]:
        """{name: the instructions using it} in one computation."""
        if computation not in self._users_of:
            users: dict[str, list[_Instruction]] = {}
            for instruction in self.instructions[computation].values():
                for operand in dict.fromkeys(instruction.operands):
                    users.setdefault(operand, []).append(instruction)
            self._users_of[computation] = users
        return self._users_of[computation]

    def _widened_from_bf16(self, computation: str, name: str, depth: int = 0) -> bool:
        """Whether ``name``'s value is a bf16 value widened (convert, through moves and fusions)."""
        instruction = self.instructions[computation].get(name)
        if instruction is None or depth > 8:
            return False
        if instruction.op == "convert":
            operand = self.instructions[computation].get(instruction.operands[0]) if instruction.operands else None
            return operand is not None and _is_bf16(operand.shape)
        if instruction.op in _MOVES and instruction.operands:
            return self._widened_from_bf16(computation, instruction.operands[0], depth + 1)
        if instruction.op == "fusion":
            callee = _CALLS.search(instruction.line)
            root = self.roots.get(callee.group("callee")) if callee else None
            return root is not None and self._widened_from_bf16(callee.group("callee"), root, depth + 1)
        return False

    def _narrowed_to_bf16(self, computation: str, name: str, depth: int = 0) -> bool:
        """Whether every use of ``name``'s value rounds it to bf16 first (through moves and into
        fusions)."""
        users = self._users(computation).get(name, [])
        if not users or depth > 8:
            return False
        for user in users:
            if user.op == "convert" and _is_bf16(user.shape):
                continue
            if user.op in _MOVES and self._narrowed_to_bf16(computation, user.name, depth + 1):
                continue
            callee = _CALLS.search(user.line) if user.op == "fusion" else None
            if callee and callee.group("callee") in self.instructions:
                inner = self.instructions[callee.group("callee")]
                index = user.operands.index(name)
                parameter = next(
                    (i.name for i in inner.values() if i.op == "parameter" and _number(_PARAMETER, i.line) == index),
                    None,
                )
                if parameter and self._narrowed_to_bf16(callee.group("callee"), parameter, depth + 1):
                    continue
            return False
        return True

    def tpu_itemsizes(self, computation: str, instruction: _Instruction) -> list[int]:
        """Bytes per element of each array a collective returns, as a TPU moves it: 2 for an fp32
        array of bf16 values that the CPU backend widened (it runs bf16 matmuls in fp32, so it
        gathers or reduces their fp32 operands or results), else the compiled dtype's size.
        A combined collective (a tuple) is judged array by array."""
        arrays = _ARRAY.findall(instruction.shape)
        sizes = []
        for index, (dtype, _) in enumerate(arrays):
            bf16 = False
            if dtype == "f32" and index < len(instruction.operands):
                bf16 = self._widened_from_bf16(computation, instruction.operands[index])
                if not bf16 and len(arrays) == 1:
                    bf16 = self._narrowed_to_bf16(computation, instruction.name)
                elif not bf16:
                    parts = [
                        user
                        for user in self._users(computation).get(instruction.name, [])
                        if user.op == "get-tuple-element" and _number(_INDEX, user.line) == index
                    ]
                    bf16 = bool(parts) and all(self._narrowed_to_bf16(computation, part.name) for part in parts)
            sizes.append(2 if bf16 else _ITEMSIZE[dtype])
        return sizes


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]")
_MESH_AXES = re.compile(r"'(?P<axis>[\w.]+)'=(?P<size>\d+)")
_OVER_AXES = re.compile(r"\{(?P<axes>'[\w.]+'(?:,\s*'[\w.]+')*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(?P<dims>[\d,]+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")


def group_size(line: str) -> int | None:
    """How many devices take part in each group of a collective's HLO line (None: no groups
    given, e.g. a collective-permute's source-target pairs)."""
    mesh = _MESH_GROUPS.search(line)
    if mesh:
        sizes = {m.group("axis"): int(m.group("size")) for m in _MESH_AXES.finditer(mesh.group("axes"))}
        over = _OVER_AXES.search(line, mesh.end())
        names = [name.strip().strip("'") for name in over.group("axes").split(",")] if over else list(sizes)
        return math.prod(sizes.get(name, 1) for name in names)
    iota = _IOTA_GROUPS.search(line)
    if iota:
        return int(iota.group("dims").split(",")[-1])
    listed = _LIST_GROUPS.search(line)
    if listed:
        return len([d for d in listed.group("first").split(",") if d])
    return None


def sent_per_device(op: str, result_bytes: float, size: int | None) -> float:
    """Bytes each device sends for one collective whose result is ``result_bytes``, by ring
    algorithms over groups of ``size``: an all-gather or all-to-all sends (size-1)/size of its
    result, an all-reduce twice that (reduce-scatter + all-gather), a reduce-scatter (size-1)
    results, a collective-permute its result."""
    if op == "collective-permute" or size is None:
        return result_bytes
    share = (size - 1) / size
    return result_bytes * {"all-reduce": 2 * share, "reduce-scatter": size - 1}.get(op, share)


def collectives_in(hlo_text: str) -> dict[str, dict[str, float]]:
    """{op: {'count', 'bytes', 'compiled_bytes', 'sent'}} of the collectives one run of compiled
    HLO text executes, those inside a while loop times its trip count: 'bytes' of their results as
    a TPU moves them (an fp32 collective of values the CPU backend widened from bf16, see
    :meth:`_Program.tpu_itemsizes`, at 2 bytes per element), 'compiled_bytes' as compiled, 'sent'
    the bytes each device sends for them (:func:`sent_per_device`)."""
    return _Program(hlo_text).collectives()


def _cost_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


@dataclasses.dataclass
class AbstractInputs:
    """The step's arguments as sharded ShapeDtypeStructs on one mesh."""

    tx: object
    state: object
    state_shardings: object
    frozen: dict
    batches: dict

    def device_bytes(self) -> dict[str, int]:
        """Exact bytes one device holds of each kind of input."""
        return {
            "frozen_params": device_bytes(self.frozen),
            "trainable_params": device_bytes(self.state.params),
            "optimizer_state": device_bytes((self.state.step, self.state.opt_state)),
            "batches": device_bytes(self.batches),
        }


def abstract_inputs(run_config, mesh) -> AbstractInputs:
    rules = sharding.RULE_SETS[run_config.mesh.rules]
    trainable_names, frozen_names = logical_names(run_config.model)

    def abstract(named):
        shardings = flat_shardings(named, mesh, rules)
        return {
            key: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings[key])
            for key, (_, value) in named.items()
        }

    trainable, frozen = abstract(trainable_names), abstract(frozen_names)
    tx = make_optimizer(run_config.optimizer)
    state_shardings = train_state_shardings(tx, trainable, mesh)
    opt_state = jax.tree.map(
        lambda value, target: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=target),
        jax.eval_shape(tx.init, trainable),
        state_shardings.opt_state,
    )
    state = TrainState(jax.ShapeDtypeStruct((), np.int32, sharding=state_shardings.step), trainable, opt_state)
    return AbstractInputs(tx, state, state_shardings, frozen, abstract_batches(run_config, mesh, rules))


def compile_step(run_config, mesh) -> Compiled:
    """AOT-compiles ``run_config``'s train step on ``mesh`` and reads XLA's analyses."""
    model_config = run_config.model
    inputs = abstract_inputs(run_config, mesh)
    graphdef = model_graphdef(model_config)
    frozen_shardings = {key: value.sharding for key, value in inputs.frozen.items()}
    step_fn = jit_train_step(run_config, graphdef, inputs.tx, inputs.state_shardings, frozen_shardings)
    started = time.perf_counter()
    with sharding.activation_sharding(mesh, sharding.RULE_SETS[run_config.mesh.rules]):
        compiled = step_fn.lower(inputs.state, inputs.frozen, inputs.batches).compile()
    compile_s = time.perf_counter() - started
    memory = compiled.memory_analysis()
    program = _Program(compiled.as_text())
    return Compiled(
        num_layers=model_config.lm.num_layers,
        num_blocks=len(model_config.xattn_layer_indices),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        flops=_cost_flops(compiled) + program.uncounted_loop_flops(),
        collectives=program.collectives(),
        compile_s=compile_s,
    )


# ----------------------------------------------------------------------------------------------
# Reduced depths and extrapolation.
# ----------------------------------------------------------------------------------------------


def with_depth(run_config, periods: int):
    """The run with the LM cut to ``first_layer + periods * every`` layers (``periods`` blocks)."""
    model = run_config.model
    layers = model.xattn.first_layer + periods * model.xattn.every
    lm = dataclasses.replace(model.lm, num_layers=layers)
    return dataclasses.replace(run_config, model=dataclasses.replace(model, lm=lm))


def extrapolate(short: Compiled, longer: Compiled, num_layers: int, num_blocks: int) -> Compiled:
    """Linear in depth: ``longer - short`` is the cost of one more period (``every`` LM layers and
    one xattn block), scaled to the full model's layer count."""
    periods = (num_layers - short.num_layers) / (longer.num_layers - short.num_layers)

    def grow(a, b):
        return a + periods * (b - a)

    ops = set(short.collectives) | set(longer.collectives)
    zero = {"count": 0, "bytes": 0.0, "compiled_bytes": 0.0, "sent": 0.0}
    collectives = {
        op: {
            field: grow(short.collectives.get(op, zero)[field], longer.collectives.get(op, zero)[field])
            for field in zero
        }
        for op in ops
    }
    return Compiled(
        num_layers=num_layers,
        num_blocks=num_blocks,
        argument_bytes=round(grow(short.argument_bytes, longer.argument_bytes)),
        output_bytes=round(grow(short.output_bytes, longer.output_bytes)),
        alias_bytes=round(grow(short.alias_bytes, longer.alias_bytes)),
        temp_bytes=round(grow(short.temp_bytes, longer.temp_bytes)),
        flops=grow(short.flops, longer.flops),
        collectives=collectives,
        compile_s=short.compile_s + longer.compile_s,
    )


def analytic_step_flops(run_config) -> float:
    """Model FLOPs of one step over every dataset of the mixture (no remat recompute)."""
    total = 0.0
    for dataset in run_config.datasets:
        shapes = batch_shapes(dataset, run_config.model)
        batch, num_media, num_frames = shapes["images"][0][:3]
        total += kind_of(run_config.model).step_flops(
            run_config.model, batch, shapes["tokens"][0][1], num_media, num_frames
        )
    return total


def plan(run_config, topology: str, depth: str = "auto", full_depth_layers: int = 16) -> dict:
    """The plan of ``run_config`` on ``topology`` (needs at least its chip count of jax devices).

    ``depth``: 'full' compiles the whole model; 'extrapolate' compiles one and two periods;
    'auto' compiles the full model when its LM has at most ``full_depth_layers`` layers.
    """
    chip, num_chips = parse_topology(topology)
    devices = jax.devices()
    if len(devices) < num_chips:
        raise ValueError(
            f"{topology} has {num_chips} chips but only {len(devices)} devices exist; run through "
            "`python -m flamingo_jax.tools.plan` (it creates them) or set jax_num_cpu_devices first"
        )
    mesh = sharding.create_mesh(run_config.mesh, devices[:num_chips])
    model = run_config.model
    full_layers, full_blocks = model.lm.num_layers, len(model.xattn_layer_indices)
    if depth == "auto":
        depth = "full" if full_layers <= full_depth_layers else "extrapolate"
    if model.lm.scan_layers:
        # The scanned step compiles at full depth in about the time of one period (its loop body
        # is compiled once); its loops' collectives and matmul FLOPs count once per trip.
        compiles = [compile_step(run_config, mesh)]
        compiled = compiles[0]
        depth = "scanned"
    elif depth == "full":
        compiles = [compile_step(run_config, mesh)]
        compiled = compiles[0]
    else:
        compiles = [compile_step(with_depth(run_config, periods), mesh) for periods in (1, 2)]
        compiled = extrapolate(*compiles, full_layers, full_blocks)
    # Input bytes are exact at full depth: shapes and shardings only, no compile needed.
    inputs = abstract_inputs(run_config, mesh).device_bytes()
    result = summarize(run_config, topology, chip, num_chips, mesh, depth, compiled, inputs)
    result["compiles"] = [
        {"lm_layers": c.num_layers, "temp_bytes": c.temp_bytes, "flops": c.flops, "compile_s": c.compile_s}
        for c in compiles
    ]
    return result


def summarize(run_config, topology, chip, num_chips, mesh, depth, compiled: Compiled, inputs: dict) -> dict:
    temp_bytes = compiled.temp_bytes
    unaliased_outputs = max(0, compiled.output_bytes - compiled.alias_bytes)
    memory = {**inputs, "temporaries": temp_bytes, "other_outputs": unaliased_outputs}
    total = sum(memory.values())
    traffic = sum(entry["sent"] for entry in compiled.collectives.values())
    compute_s = compiled.flops / chip.peak_flops
    comm_s = traffic / chip.ici_bytes_per_s
    step_s = compute_s + comm_s
    overlapped_s = max(compute_s, comm_s)
    model_flops = analytic_step_flops(run_config)
    # XLA's FLOPs per chip against the model's share per chip: above 1, chips compute work that
    # another chip also does (or remat recomputes it).
    duplication = compiled.flops / (model_flops / num_chips)
    tokens = sum(math.prod(batch_shapes(d, run_config.model)["tokens"][0]) for d in run_config.datasets)
    return {
        "topology": topology,
        "chip": chip.name,
        "chips": num_chips,
        "mesh": dict(mesh.shape),
        "rules": run_config.mesh.rules,
        "depth": {
            "full": "full",
            "scanned": "full, scanned (the loop's matmul FLOPs and collectives once per trip)",
        }.get(
            depth,
            f"extrapolated from one- and two-period compiles ({run_config.model.xattn.every} layers each) "
            f"to {compiled.num_layers} layers",
        ),
        "lm_layers": compiled.num_layers,
        "xattn_blocks": compiled.num_blocks,
        "memory_bytes": memory,
        "total_bytes": total,
        "hbm_bytes": chip.hbm_bytes,
        "fits": total < chip.hbm_bytes,
        "xla_flops_per_device": compiled.flops,
        "model_flops_per_step": model_flops,
        "tokens_per_step": tokens,
        "collectives": compiled.collectives,
        "collective_bytes_per_device": traffic,
        "compute_s": compute_s,
        "communication_s": comm_s,
        "step_s": step_s,
        "mfu": model_flops / (num_chips * chip.peak_flops * step_s),
        "overlapped_step_s": overlapped_s,
        "overlapped_mfu": model_flops / (num_chips * chip.peak_flops * overlapped_s),
        "xla_over_model_flops": duplication,
        "tokens_per_s": tokens / step_s,
        "compile_s": compiled.compile_s,
    }


CAVEATS = (
    "Parameter, optimizer-state and batch bytes are exact (from the shardings). Temporaries come from "
    "XLA's CPU-backend memory analysis of the SPMD-partitioned step: fusion and scheduling on TPU differ, "
    "so treat them as an estimate. Step time assumes peak bf16 FLOP/s for XLA's FLOP count and "
    "collectives (the bytes each chip sends, ring algorithms) at the chip's ICI bandwidth, either "
    "after the compute (no overlap) or hidden under it "
    "(overlapped); MFU counts model FLOPs (no remat). The CPU backend runs bf16 matmuls in fp32, so it "
    "gathers and reduces fp32 copies of bf16 values; those count at bf16's size, as a TPU moves them."
)


def format_plan(result: dict) -> str:
    gib = lambda value: f"{value / GIB:.2f}"
    mesh = " x ".join(f"{axis}={size}" for axis, size in result["mesh"].items())
    lines = [
        f"{result['topology']}: {result['chips']} x {result['chip']} ({gib(result['hbm_bytes'])} GiB HBM each), "
        f"mesh {mesh}, rules {result['rules']!r}",
        f"LM layers {result['lm_layers']}, xattn blocks {result['xattn_blocks']}; depth: {result['depth']}",
        "",
        "| per device | GiB |",
        "|---|---|",
    ]
    for kind, value in result["memory_bytes"].items():
        lines.append(f"| {kind.replace('_', ' ')} | {gib(value)} |")
    verdict = "fits" if result["fits"] else "DOES NOT FIT"
    lines.append(f"| **total** | **{gib(result['total_bytes'])}** ({verdict} in {gib(result['hbm_bytes'])}) |")
    lines += [
        "",
        "| collective | count | result GiB per device (TPU) | as compiled for CPU | GiB sent per device |",
        "|---|---|---|---|---|",
    ]
    for op, entry in sorted(result["collectives"].items()):
        lines.append(
            f"| {op} | {entry['count']:.0f} | {gib(entry['bytes'])} | {gib(entry['compiled_bytes'])} "
            f"| {gib(entry['sent'])} |"
        )
    lines += [
        "",
        f"FLOPs per device per step (XLA): {result['xla_flops_per_device']:.3e}; "
        f"model FLOPs per step (all chips): {result['model_flops_per_step']:.3e}",
        f"XLA FLOPs per device / (model FLOPs / chips): {result['xla_over_model_flops']:.2f}"
        + (" (duplicated compute or remat)" if result["xla_over_model_flops"] > 1.1 else ""),
        f"projected step: {result['step_s']:.2f} s (compute {result['compute_s']:.2f} s at peak + "
        f"collectives {result['communication_s']:.2f} s), MFU {100 * result['mfu']:.1f}%, "
        f"{result['tokens_per_s']:,.0f} tokens/s; collectives overlapped with compute: "
        f"{result['overlapped_step_s']:.2f} s, MFU {100 * result['overlapped_mfu']:.1f}%",
        "compiled: "
        + "; ".join(
            f"{c['lm_layers']} LM layers in {c['compile_s']:.0f} s (temporaries {gib(c['temp_bytes'])} GiB)"
            for c in result.get("compiles", [])
        ),
        "",
        CAVEATS,
    ]
    return "\n".join(lines)


def main(argv) -> None:
    args = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"flamingo_jax.tools.plan: unexpected arguments {argv[1:]}")
    if not args.gin_file:
        sys.exit("flamingo_jax.tools.plan: --gin_file is required, e.g. --gin_file=runs/flamingo_80b.gin")
    try:
        _, num_chips = parse_topology(args.topology)
        configs.parse_gin(args.gin_file, args.gin_bindings)
        run_config = configs.run_config()
    except (ValueError, TypeError, FileNotFoundError) as error:
        sys.exit(f"flamingo_jax.tools.plan: {error}")
    # One fake CPU device per chip; must happen before anything touches a device.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_chips)
    try:
        result = plan(run_config, args.topology, args.depth)
    except ValueError as error:
        sys.exit(f"flamingo_jax.tools.plan: {error}")
    print(format_plan(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main, argv=configs.rewrite_gin_args(sys.argv))
