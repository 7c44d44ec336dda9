"""Will a run compile and fit on a Cloud TPU slice? Find out on a CPU machine, before renting one.

    python -m launch.aot --topology=v6e:2x4 [--num_slices=2] [--mesh data=1,fsdp=-1,tensor=1] [--json] \
        -- TRAIN.PY ARGUMENTS                # the train command's own arguments, unchanged
    python -m launch.aot --all               # every shipped config x its topologies -> the table in BENCHMARKS.md
                                             # (memory and FLOPs per chip per step)

Compiles (never runs) the run's real train step, built by `trainer.program.build` exactly as train.py builds it, from
abstract state for compile-only devices of a TPU topology (`jax.experimental.topologies`, from libtpu: install
requirements-tpu.txt). Nothing is allocated; of INIT_FROM only config.json is read (the network's shapes), and the
corpora are never read, so the data flags may name files that exist only in the bucket or on the TPU VM (data
macros a run file leaves empty get stand-ins). The gin flags may also come before `--` (`--gin_file=... --gin.X=Y`).

Prints per chip the compiler's peak (arguments + what is live at the peak) against the chip's HBM and the share
left free, which must be at least 10% (launch.memory says why and what each number is); the compile time; the
collectives; and, when it does not fit, the compiler's message and what to change. Exit status: 0 fits, 1 does not
fit, 2 configuration error, 3 libtpu missing (the table in exit_codes.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import exit_codes
import repo
from launch import memory, topology

PROG = "python -m launch.aot"
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# `--all`: each shipped model config at the batch a midtraining run uses, on the topologies it is sized for, with
# the settings that topology needs beyond the model config's own; then the run files as written, with Llama 3.1 8B
# (the config.json of models/llama3_1_8b.gin) as INIT_FROM.
ALL_BATCH, ALL_SEQ = 64, 2048
SHIPPED = (("models/llama3_1_8b.gin", "v6e:2x4", ("TrainConfig.microbatches=2",)),
           ("models/llama3_1_8b.gin", "v5p:2x2x1", ()),
           ("models/llama3_2_1b.gin", "v5e:2x2", ("TrainConfig.microbatches=4",)),
           ("models/qwen3_0_6b.gin", "v5e:2x2", ("TrainConfig.microbatches=4",)),
           # The shipped SmolLM2 config is the CPU test model (fp32 compute, no remat): without these it does not fit
           # a v5e chip, mostly for the saved [rows, heads, seq, seq] attention scores of 30 layers.
           ("models/smollm2_135m.gin", "v5e:2x2", ("TrainConfig.microbatches=4", "TrainConfig.loss_chunk=256",
                                                   "ModelConfig.compute_dtype='bfloat16'", "ModelConfig.remat='full'")))
SHIPPED_RUNS = (("runs/midtrain.gin", "v6e:2x4"), ("runs/midtrain.gin", "v5p:2x2x1"),
                ("runs/sft.gin", "v6e:2x4"), ("runs/sft.gin", "v5p:2x2x1"))
ALL_INIT_FROM = "models/llama3_1_8b.gin"
# Stand-ins for paths a run needs but launch.aot never reads (given bindings override them).
PLACEHOLDERS = ("MODEL_DIR='/unused/aot'", "MixtureConfig.tokenizer='/unused/tokenizer'")
DATA_MACROS = ("INIT_FROM", "REPLAY_FILES", "SYNTHETIC_FILES", "SFT_FILES")
TABLE_START, TABLE_END = "<!-- launch.aot --all: start -->", "<!-- launch.aot --all: end -->"


def parse_mesh(text: str) -> dict[str, int]:
    """`data=1,fsdp=-1,tensor=1[,dcn_data=2]` -> dict; unknown axes and non-integers are errors."""
    axes = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in ("data", "fsdp", "tensor", "dcn_data") or not re.fullmatch(r"-?\d+", value.strip()):
            raise ValueError(f"--mesh {text!r}: expected NAME=INT pairs over data, fsdp, tensor, dcn_data")
        axes[name.strip()] = int(value)
    return axes


def collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective op the optimised HLO holds (a scanned loop body counts once). The TPU compiler
    emits a reduce-scatter as a computation named `all-reduce-scatter*` holding an all-reduce and a dynamic slice of
    its result; those all-reduces count as reduce-scatters."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    computation = ""
    for line in hlo_text.splitlines():
        if line[:1] not in ("", " ") and line.rstrip().endswith("{"):  # a computation's header
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        for op in COLLECTIVES:
            if re.match(rf"\s*(?:ROOT )?%\S+ = .*? {op}(?:-start)?\(", line):  # (a tuple shape may hold "=")
                scatter = op == "all-reduce" and computation.startswith("all-reduce-scatter")
                counts["reduce-scatter" if scatter else op] += 1
    return counts


@dataclasses.dataclass
class CompiledStep:
    """A run's train step compiled for a topology: `compiled` is the executable (None when the compiler ran out of
    memory, then `error` holds its message). Its `memory_analysis()` gives the report; `cost_analysis()` the FLOPs."""
    run: Any
    topology: str
    num_slices: int
    devices: list
    mesh: Any
    program: Any
    compiled: Any
    error: str | None
    seconds: float


def compile_step(run: Any, topology_name: str, mesh_axes: dict[str, int] | None = None,
                 num_slices: int = 1) -> CompiledStep:
    """Compiles `run`'s train step (trainer.program.build, as train.py builds it) for compile-only devices, on the
    run's own mesh (TrainConfig.mesh, whose `dcn_data` lays the data axis over slices) unless `mesh_axes` says
    otherwise."""
    import jax

    from models import sharding
    from trainer import program as program_lib

    devices = topology.topology_devices(topology_name, num_slices)
    mesh = sharding.make_mesh(**(mesh_axes if mesh_axes is not None else run.train.mesh), devices=devices)
    program = program_lib.build(run, mesh, len(run.mixture.components))
    batch = program.example_batch(run.train.batch_size, run.train.seq_len)
    start = time.perf_counter()
    compiled, error = None, None
    with jax.set_mesh(mesh):
        lowered = program.train_step.lower(program.abstract_state, batch)
        try:
            compiled = lowered.compile()
        except Exception as e:  # the TPU compiler's out-of-memory error is a plain XlaRuntimeError
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            error = str(e).strip()
    return CompiledStep(run, topology_name, num_slices, devices, mesh, program, compiled, error,
                        time.perf_counter() - start)


def has_loops(run: Any) -> bool:
    """Whether the train step runs loops: scanned layers, microbatches, loss chunks."""
    return run.model.scan_layers or run.train.microbatches > 1 or run.train.loss_chunk is not None


def cost_flops(compiled: Any) -> float:
    """FLOPs per chip of one run of a compiled program: XLA's cost analysis (`compiled.cost_analysis()`)."""
    analysis = compiled.cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def step_flops(step: CompiledStep, mesh_axes: dict[str, int] | None = None) -> float | None:
    """FLOPs per chip of one train step of `step.run` (None when no compile of it fits the chips).

    XLA's cost analysis counts the body of a loop once, whatever its trip count. A step without loops is counted
    from its own compile. A step with loops (has_loops), or one that does not fit, is compiled again unrolled
    (layers unscanned, one microbatch, the loss unchunked; the same remat, mesh and sequence length) at one and at
    two rows per batch shard, which are small enough to fit: its FLOPs are affine in the rows (the optimizer update
    is the constant), so the two give the step's at its batch exactly."""
    run = step.run
    if step.compiled is not None and not has_loops(run):
        return cost_flops(step.compiled)
    shards = step.mesh.shape["data"] * step.mesh.shape["fsdp"]
    flops = []
    for rows in (shards, 2 * shards):
        twin = dataclasses.replace(run, model=dataclasses.replace(run.model, scan_layers=False), train=dataclasses.replace(
            run.train, microbatches=1, loss_chunk=None, batch_size=rows))
        unrolled = compile_step(twin, step.topology, mesh_axes, step.num_slices)
        if unrolled.compiled is None:
            return None
        flops.append(cost_flops(unrolled.compiled))
    return flops[0] + (flops[1] - flops[0]) * (run.train.batch_size - shards) / shards


def report(step: CompiledStep, free_fraction: float = memory.HBM_FREE) -> dict[str, Any]:
    """The JSON-able report of a compiled step (launch.memory defines the memory fields)."""
    run, program = step.run, step.program
    kind = step.devices[0].device_kind
    hbm = topology.hbm_bytes(kind)
    state_total, state_chip, replicated = memory.per_chip_bytes(program.abstract_state, program.state_shardings)
    batch = program.example_batch(run.train.batch_size, run.train.seq_len)
    batch_chip = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in batch.values())
    r: dict[str, Any] = {
        "topology": step.topology, "num_slices": step.num_slices, "device_kind": kind, "chips": len(step.devices),
        "mesh": dict(step.mesh.shape), "batch_size": run.train.batch_size, "seq_len": run.train.seq_len,
        "microbatches": run.train.microbatches, "loss_chunk": run.train.loss_chunk, "remat": run.model.remat,
        "attention": run.model.attention, "param_dtype": run.model.param_dtype,
        "compute_dtype": run.model.compute_dtype, "state_bytes": state_total, "state_bytes_per_chip": state_chip,
        "replicated_state_bytes": replicated, "batch_bytes_per_chip": batch_chip, "hbm_bytes": hbm,
        "compile_seconds": round(step.seconds, 1),
    }
    if step.compiled is None:
        # "Used 23.7G of 15.75G hbm" or "HLO temporaries (592.59G) exceeds available HBM (15.75G)"
        needed = re.search(r"Used ([\d.]+)([KMGT])? of|\(([\d.]+)([KMGT])?\) exceeds available HBM", step.error)
        r.update(fits=False, error=step.error.splitlines()[0][:2000],
                 needed_bytes=_size(*[g for g in needed.groups() if g][:2]) if needed else None)
    else:
        r.update(memory.from_analysis(step.compiled.memory_analysis(), hbm, free_fraction),
                 collectives=collectives(step.compiled.as_text()))
    if not r["fits"]:
        r["suggestion"] = memory.suggestion(run, r["mesh"], len(step.devices))
    return r


def _size(number: str, unit: str | None = None) -> int:
    return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def load_run(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()) -> Any:
    """`trainer.config.load` with stand-ins for MODEL_DIR, the tokenizer and the data macros the run files define
    but leave empty (they are never read here); the given bindings win over the stand-ins. A run file that takes
    its network from INIT_FROM reads INIT_FROM's config.json when INIT_FROM is given; when it is not, the network
    comes from a `models/*.gin` file given with it."""
    import gin

    from trainer import config

    try:
        return config.load(gin_files, [*PLACEHOLDERS, *bindings], search_paths)
    except config.ConfigError:
        empty = []  # gin still holds the parsed files and bindings: which data macros are defined but empty?
        for macro in DATA_MACROS:
            try:
                if not gin.query_parameter(f"{macro}/macro.value"):
                    empty.append(macro)
            except ValueError:  # not defined by these files
                pass
        if not empty:
            raise
    stand_ins = [f"{m}='/unused/{m.lower()}'" if m == "INIT_FROM" else f"{m}=('/unused/{m.lower()}',)"
                 for m in empty]
    if "INIT_FROM" in empty:  # a run file that takes its model from INIT_FROM: the model gin file given instead
        stand_ins.append("RunConfig.model=@ModelConfig()")
    return config.load(gin_files, [*PLACEHOLDERS, *stand_ins, *bindings], search_paths)


def load_train_args(train_args: Sequence[str], gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
                    search_paths: Sequence[str] = ()) -> Any:
    """The RunConfig of a train command's arguments (parsed by train.py's own parser), after any gin flags given
    before them."""
    from trainer import cli

    args = cli.parse_train_args(train_args)
    return load_run([*gin_files, *args.gin_file], [*bindings, *args.gin_bindings],
                    [*search_paths, *args.gin_search_paths])


def write_init_from(model_gin: str, folder: pathlib.Path) -> str:
    """Writes the config.json of a `models/*.gin` file into `folder` (an INIT_FROM for a compile: no weights)."""
    run = load_run(["base.gin", "mixtures/replay_synthetic.gin", model_gin], [])
    (folder / "config.json").write_text(json.dumps(run.model.to_hf(), indent=1))
    return str(folder)


def run_all(bindings: list[str], benchmarks: pathlib.Path) -> int:
    """Compiles every shipped config for its topologies and rewrites the table between the markers in BENCHMARKS.md."""
    rows = ["| config | topology | mesh d/f/t | batch | microbatches | loss chunk | params/compute | "
            "peak GiB per chip | HBM GiB | free | fits | compile s | TFLOP per chip per step |", "|---" * 13 + "|"]
    jobs = [(model, topo, load_run(["base.gin", "mixtures/replay_synthetic.gin", model],
                                   [f"BATCH_SIZE={ALL_BATCH}", f"SEQ_LEN={ALL_SEQ}", *settings, *bindings]))
            for model, topo, settings in SHIPPED]
    with tempfile.TemporaryDirectory() as tmp:
        init_from = write_init_from(ALL_INIT_FROM, pathlib.Path(tmp))
        for run_file, topo in SHIPPED_RUNS:
            jobs.append((f"{run_file} (INIT_FROM: {ALL_INIT_FROM})", topo,
                         load_run([run_file], [f"INIT_FROM='{init_from}'", *bindings])))
    all_fit = True
    for name, topo, run in jobs:
        step = compile_step(run, topo)
        r = report(step)
        flops = step_flops(step) if r["fits"] else None  # a step with loops compiles its unrolled twins too
        row = memory.table_row(name, r) + (f" {flops / 1e12:.3g} |" if flops else " - |")
        print(row, flush=True)
        rows.append(row)
        all_fit &= r["fits"]
    text = benchmarks.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{benchmarks}: no {TABLE_START} ... {TABLE_END} markers to write the table between")
    head, rest = text.split(TABLE_START, 1)
    benchmarks.write_text(head + TABLE_START + "\n" + "\n".join(rows) + "\n" + TABLE_END + rest.split(TABLE_END, 1)[1])
    print(f"wrote {len(rows) - 2} rows to {benchmarks}")
    return 0 if all_fit else 1


def main(argv: Sequence[str] | None = None) -> int:
    from trainer import config

    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    config.add_gin_flags(parser)
    parser.add_argument("--topology", help="TPU topology NAME:AxB[xC], e.g. v5p:2x2x1, v6e:2x4, v5e:2x2")
    parser.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (multi-slice)")
    parser.add_argument("--mesh", type=parse_mesh, default=None,
                        help="mesh axes, e.g. data=1,fsdp=-1,tensor=1 (default: the run's TrainConfig.mesh)")
    parser.add_argument("--hbm_free", type=float, default=memory.HBM_FREE,
                        help="share of each chip's HBM that must stay free beyond the step's peak (default 0.10)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--all", action="store_true", help="compile every shipped config for its topologies "
                        "and write the table into --benchmarks")
    parser.add_argument("--benchmarks", type=pathlib.Path,
                        default=repo.ROOT / "BENCHMARKS.md")
    args = parser.parse_args(ours)
    missing = topology.libtpu_missing()
    if missing:
        raise missing
    if args.all:
        return run_all(args.gin_bindings, args.benchmarks)
    if not args.topology:
        parser.error("--topology is required (or --all)")
    run = load_train_args(train_args, args.gin_file, args.gin_bindings, args.gin_search_paths)
    r = report(compile_step(run, args.topology, args.mesh, args.num_slices), args.hbm_free)
    print(json.dumps(r, indent=1) if args.json else memory.format_report(r))
    if not r["fits"]:
        raise exit_codes.Failed(exit_codes.STOPPED, f"the run does not fit {args.topology} (the report above says "
                                "what to change)")
    return 0


if __name__ == "__main__":
    sys.exit(exit_codes.run(main, PROG))
