"""Will a run compile and fit on a Cloud TPU slice? Find out on a CPU machine, before renting one.

    python -m launch.aot --gin_file=runs/midtrain.gin --topology=v5p:2x2x1 [--mesh data=1,fsdp=-1,tensor=1] \
        [--num_slices=2] [--gin.KEY=VALUE ...] [--json]
    python -m launch.aot --all            # every shipped model x its topologies -> the table in BENCHMARKS.md

Compiles (never runs) the run's real train step, built by `trainer.program.build` exactly as train.py builds it, from
abstract state for compile-only devices of a TPU topology (`jax.experimental.topologies`, from libtpu: install
requirements-tpu.txt). Nothing is allocated and neither INIT_FROM nor the corpora are read, so the data bindings may
name files that exist only on the TPU VM. Prints per-chip argument / temp / peak bytes against the chip's HBM, the
compile time, the collectives and whether it fits; on the compiler's out-of-memory error, its message and what to
change. Exit status: 0 fits, 1 does not fit, 2 configuration error.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any

# Usable HBM per chip as the TPU compiler reports it in its out-of-memory message ("Used X of Y hbm"), in GiB.
HBM_GIB = {"TPU v4": 31.25, "TPU v5 lite": 15.75, "TPU v5": 95.74, "TPU v6 lite": 31.25}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
GIB = 2 ** 30

# `--all`: each shipped model config at the batch a midtraining run uses, on the topologies it is sized for, with
# the settings that topology needs beyond the model config's own.
ALL_BATCH, ALL_SEQ = 64, 2048
SHIPPED = (("models/llama3_1_8b.gin", "v6e:2x4", ()),
           ("models/llama3_1_8b.gin", "v5p:2x2x1", ()),
           ("models/llama3_2_1b.gin", "v5e:2x2", ("TrainConfig.microbatches=4",)),
           ("models/qwen3_0_6b.gin", "v5e:2x2", ("TrainConfig.microbatches=4",)),
           # The shipped SmolLM2 config is the CPU test model (fp32 compute, no remat): without these it needs 38.7 GiB
           # per chip here, mostly saved [rows, heads, seq, seq] attention scores of 30 layers.
           ("models/smollm2_135m.gin", "v5e:2x2", ("TrainConfig.microbatches=4", "TrainConfig.loss_chunk=256",
                                                   "ModelConfig.compute_dtype='bfloat16'", "ModelConfig.remat='full'")))
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


def topology_devices(name: str, num_slices: int = 1) -> list[Any]:
    """Compile-only devices of a TPU topology such as `v5p:2x2x1`, `v6e:2x4` or `v5e:2x2` (libtpu needed)."""
    # libtpu takes a lock file per process unless told otherwise (another compile, a test run in parallel), and
    # warns when it cannot find TPU workers, which a compile-only topology does not need.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", name):
        raise ValueError(f"--topology {name!r}: expected NAME:AxB[xC] such as v5p:2x2x1, v6e:2x4, v5e:2x2")
    try:
        kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise RuntimeError("launch.aot needs libtpu: pip install -r requirements-tpu.txt") from None
        raise


def _bytes(x: Any) -> int:
    return math.prod(x.shape) * x.dtype.itemsize


def _per_chip_bytes(abstract: Any, shardings: Any) -> tuple[int, int, int]:
    """(total bytes, bytes per chip, bytes of replicated arrays) of abstract state under its sharding prefix tree."""
    import jax

    sizes = []  # (total, per chip, replicated) of each array
    def add(sharding, subtree):
        for x in jax.tree.leaves(subtree):
            chip = math.prod(sharding.shard_shape(x.shape)) * x.dtype.itemsize
            sizes.append((_bytes(x), chip, _bytes(x) if sharding.is_fully_replicated else 0))
    jax.tree.map(add, shardings, abstract)
    return tuple(sum(col) for col in zip(*sizes))


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


def suggestion(run: Any, mesh: dict[str, int], chips: int) -> str:
    """What to try when a step does not fit, most effective first."""
    t, m = run.train, run.model
    tips = []
    if t.loss_chunk is None and m.vocab_size >= 32768:
        tips.append(f"--gin.TrainConfig.loss_chunk={min(512, t.seq_len)} (blocks of logits instead of all "
                    f"[rows, {t.seq_len}, {m.vocab_size}] float32 logits)")
    if m.remat != "full":
        tips.append("--gin.ModelConfig.remat='full'")
    rows = t.batch_size // max(mesh.get("data", 1) * mesh.get("fsdp", 1), 1)
    more = [k for k in range(t.microbatches + 1, t.batch_size + 1) if t.batch_size % k == 0 and rows % k == 0]
    if more:
        tips.append(f"--gin.TrainConfig.microbatches={more[0]} (accumulate gradients; same global batch)")
    if mesh.get("tensor", 1) == 1:
        tips.append("--mesh data=1,fsdp=-1,tensor=2 (tensor parallelism splits the vocabulary and MLP too)")
    tips.append(f"a topology with more than {chips} chips")
    return "; or ".join(tips)


def compile_report(run: Any, topology: str, mesh_axes: dict[str, int] | None = None,
                   num_slices: int = 1) -> dict[str, Any]:
    """Compiles `run`'s train step for `topology` and returns the report (a JSON-able dict)."""
    import jax

    from models import sharding
    from trainer import program as program_lib

    devices = topology_devices(topology, num_slices)
    axes = dict(mesh_axes if mesh_axes is not None else run.train.mesh)
    if num_slices > 1:
        axes.setdefault("dcn_data", num_slices)
    mesh = sharding.make_mesh(**axes, devices=devices)
    program = program_lib.build(run, mesh, len(run.mixture.components))
    state = program.abstract_state
    batch = program.example_batch(run.train.batch_size, run.train.seq_len)
    kind = devices[0].device_kind
    hbm = int(HBM_GIB[kind] * GIB) if kind in HBM_GIB else None
    state_total, state_chip, replicated = _per_chip_bytes(state, program.state_shardings)
    batch_chip = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in batch.values())
    report: dict[str, Any] = {
        "topology": topology, "num_slices": num_slices, "device_kind": kind, "chips": len(devices),
        "mesh": dict(mesh.shape), "batch_size": run.train.batch_size, "seq_len": run.train.seq_len,
        "microbatches": run.train.microbatches, "loss_chunk": run.train.loss_chunk, "remat": run.model.remat,
        "attention": run.model.attention, "param_dtype": run.model.param_dtype,
        "compute_dtype": run.model.compute_dtype, "state_bytes": state_total, "state_bytes_per_chip": state_chip,
        "replicated_state_bytes": replicated, "batch_bytes_per_chip": batch_chip, "hbm_bytes": hbm,
    }
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = program.train_step.lower(state, batch)
        try:
            compiled = lowered.compile()
        except Exception as e:  # the TPU compiler's out-of-memory error is a plain XlaRuntimeError
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            # "Used 23.7G of 15.75G hbm" or "HLO temporaries (592.59G) exceeds available HBM (15.75G)"
            needed = re.search(r"Used ([\d.]+)([KMGT])? of|\(([\d.]+)([KMGT])?\) exceeds available HBM", str(e))
            report.update(fits=False, compile_seconds=round(time.perf_counter() - start, 1),
                          error=str(e).strip().splitlines()[0][:2000],
                          needed_bytes=_size(*[g for g in needed.groups() if g][:2]) if needed else None,
                          suggestion=suggestion(run, dict(mesh.shape), len(devices)))
            return report
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or
               mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
    fits = hbm is None or peak <= hbm
    report.update(fits=fits, compile_seconds=round(seconds, 1), argument_bytes=int(mem.argument_size_in_bytes),
                  output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
                  temp_bytes=int(mem.temp_size_in_bytes), peak_bytes=peak,
                  collectives=collectives(compiled.as_text()))
    if not fits:
        report["suggestion"] = suggestion(run, dict(mesh.shape), len(devices))
    return report


def _size(number: str, unit: str | None = None) -> int:
    return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def format_report(r: dict[str, Any]) -> str:
    gib = lambda b: "?" if b is None else f"{b / GIB:.2f} GiB"  # noqa: E731
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
    lines = [f"{r['topology']}{slices}: {r['chips']} chips "
             f"of {r['device_kind']} (HBM {gib(r['hbm_bytes'])} each), mesh {mesh}",
             f"batch {r['batch_size']} x {r['seq_len']}, microbatches {r['microbatches']}, loss_chunk "
             f"{r['loss_chunk']}, remat {r['remat']}, params {r['param_dtype']}, compute {r['compute_dtype']}",
             f"train state {gib(r['state_bytes'])} = {gib(r['state_bytes_per_chip'])} per chip",
             f"compiled in {r['compile_seconds']} s"]
    if "peak_bytes" in r:
        lines += [f"per chip: arguments {gib(r['argument_bytes'])}, temporaries {gib(r['temp_bytes'])}, "
                  f"peak {gib(r['peak_bytes'])} of {gib(r['hbm_bytes'])}",
                  "collectives: " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items() if v)]
    else:
        lines += [f"out of memory: {r['error']}"]
    lines.append("FITS" if r["fits"] else f"DOES NOT FIT. Try: {r['suggestion']}")
    return "\n".join(lines)


def table_row(model: str, r: dict[str, Any]) -> str:
    need = r.get("peak_bytes") or r.get("needed_bytes")
    peak = "?" if need is None else f"{need / GIB:.1f}"
    mesh = "/".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    chunk = r["loss_chunk"] or "-"
    return (f"| {model} | {r['topology']} | {mesh} | {r['batch_size']}x{r['seq_len']} | {r['microbatches']} | "
            f"{chunk} | {r['param_dtype']}/{r['compute_dtype']} | {peak} | {r['hbm_bytes'] / GIB:.2f} | "
            f"{'yes' if r['fits'] else 'no'} | {r['compile_seconds']} |")


def load_run(gin_files: list[str], bindings: list[str], search_paths: list[str] = ()) -> Any:
    """`trainer.config.load` with stand-ins for MODEL_DIR, the tokenizer and the data macros the run defines but
    leaves empty (they are never read here); the given bindings win over the stand-ins."""
    import gin

    from trainer import config

    try:
        return config.load(gin_files, [*PLACEHOLDERS, *bindings], search_paths)
    except config.ConfigError:
        defined = []  # gin still holds the parsed files: which data macros do they define?
        for macro in DATA_MACROS:
            try:
                gin.query_parameter(f"{macro}/macro.value")
                defined.append(macro)
            except ValueError:
                pass
        if not defined:
            raise
    stand_ins = [f"{m}='/unused/{m.lower()}'" if m == "INIT_FROM" else f"{m}=('/unused/{m.lower()}',)"
                 for m in defined]
    if "INIT_FROM" in defined:  # a run file that takes its model from INIT_FROM: the model gin file given instead
        stand_ins.append("RunConfig.model=@ModelConfig()")
    return config.load(gin_files, [*PLACEHOLDERS, *stand_ins, *bindings], search_paths)


def run_all(bindings: list[str], benchmarks: pathlib.Path) -> int:
    """Compiles every shipped model for its topologies and rewrites the table between the markers in BENCHMARKS.md."""
    from trainer import config

    rows = ["| model config | topology | mesh d/f/t | batch | microbatches | loss chunk | params/compute | "
            "peak GiB per chip | HBM GiB | fits | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    all_fit = True
    for model, topology, settings in SHIPPED:
        run = load_run(["base.gin", "mixtures/replay_synthetic.gin", model],
                       [f"BATCH_SIZE={ALL_BATCH}", f"SEQ_LEN={ALL_SEQ}", *settings, *bindings])
        report = compile_report(run, topology)
        print(table_row(model, report), flush=True)
        rows.append(table_row(model, report))
        all_fit &= report["fits"]
    text = benchmarks.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{benchmarks}: no {TABLE_START} ... {TABLE_END} markers to write the table between")
    head, rest = text.split(TABLE_START, 1)
    benchmarks.write_text(head + TABLE_START + "\n" + "\n".join(rows) + "\n" + TABLE_END + rest.split(TABLE_END, 1)[1])
    print(f"wrote {len(rows) - 2} rows to {benchmarks}")
    return 0 if all_fit else 1


def main(argv: list[str] | None = None) -> int:
    from trainer import config

    parser = argparse.ArgumentParser(prog="python -m launch.aot", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    config.add_gin_flags(parser)
    parser.add_argument("--topology", help="TPU topology NAME:AxB[xC], e.g. v5p:2x2x1, v6e:2x4, v5e:2x2")
    parser.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (multi-slice)")
    parser.add_argument("--mesh", type=parse_mesh, default=None,
                        help="mesh axes, e.g. data=1,fsdp=-1,tensor=1 (default: the run's TrainConfig.mesh)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--all", action="store_true", help="compile every shipped model config for its topologies "
                        "and write the table into --benchmarks")
    parser.add_argument("--benchmarks", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("libtpu") is None:  # the optional TPU extra: one line, exit 3 (exit_codes)
        print("python -m launch.aot: error: needs the TPU extra (libtpu is not installed): "
              "pip install -r requirements-tpu.txt", file=sys.stderr)
        return 3
    try:
        if args.all:
            return run_all(args.gin_bindings, args.benchmarks)
        if not args.topology:
            parser.error("--topology is required (or --all)")
        run = load_run(args.gin_file, args.gin_bindings, args.gin_search_paths)
        report = compile_report(run, args.topology, args.mesh, args.num_slices)
    except (config.ConfigError, ValueError, RuntimeError) as e:
        print(f"launch.aot: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
