"""Priced dry runs (sweep.py and experiments.durability --dry_run --topology): each distinct config shape compiled
once for the topology (counted), a run's cost equal to tokens / (FLOPs-based tokens per second) x chips x price by
hand for two topologies and a user's price table, the FLOPs of a step with loops equal to its unrolled compile's, and
one line with exit 3 without the TPU extra."""
import importlib.util
import json
import pathlib
import tomllib

import pytest

import sweep
from launch import aot, pricing
from tests import test_estimate

REPO = pathlib.Path(__file__).resolve().parents[1]
# test_estimate's sweep (2 shapes, 8 runs) on the tiny model with its layers unrolled (one microbatch, an unchunked
# loss): one compile gives each shape's memory and FLOPs.
SWEEP = test_estimate.SWEEP.replace('"runs/demo.gin"]', '"runs/demo.gin", "models/tiny.gin"]').replace(
    '"TrainConfig.eval_every = 1000"]', '"TrainConfig.eval_every = 1000", "ModelConfig.scan_layers = False"]')


@pytest.fixture
def sweep_file(tmp_path) -> pathlib.Path:
    return test_estimate.write_sweep(tmp_path, SWEEP)


@pytest.mark.tpu
@pytest.mark.slow  # 3 compiles for TPU topologies: ~35 s on a loaded 2-core machine
def test_priced_dry_run_is_tokens_over_flops_throughput_times_price(sweep_file, tmp_path, monkeypatch, capsys):
    """v5p at the shipped prices: 8 runs of 2 shapes, 2 compiles; v6e at a user's prices: the short shape's 4 runs."""
    compiles = []  # (sequence length, FLOPs per chip from the compiled step's cost analysis, chips)
    real = aot.compile_step

    def counting(run, topology_name, *args, **kwargs):
        step = real(run, topology_name, *args, **kwargs)
        compiles.append((run.train.seq_len, step.compiled.cost_analysis()["flops"], len(step.devices)))
        return step

    monkeypatch.setattr(aot, "compile_step", counting)
    user = tmp_path / "my_prices.toml"
    user.write_text('source = "our contract"\n[v6e.lab-region]\non_demand = 10.0\nspot = 3.0\n')
    shipped = tomllib.loads((REPO / "launch" / "prices.toml").read_text())
    short = sweep_file.with_name("short.toml")
    short.write_text(sweep_file.read_text().split("[models.long]")[0] + "[corpora]" +
                     sweep_file.read_text().split("[corpora]")[1])
    for path, topology, flags, price, peak, shapes in (
            (sweep_file, "v5p:2x2x1", [], shipped["v5p"]["us-east5"], 459e12, 2),
            (short, "v6e:2x4", [f"--prices={user}", "--region=lab-region"], {"on_demand": 10.0, "spot": 3.0}, 918e12,
             1)):
        compiles.clear()
        assert sweep.main([str(path), "--dry_run", "--json", f"--topology={topology}", "--mfu=0.5", *flags]) == 0
        runs = json.loads(capsys.readouterr().out)
        assert len(runs) == 4 * shapes and len(compiles) == shapes     # one compile per distinct config shape
        flops = {seq: (f, chips) for seq, f, chips in compiles}
        for r in runs:
            f, chips = flops[r["tokens_per_step"] // 8]
            tokens_per_s = r["tokens_per_step"] / (f / (peak * 0.5))
            chip_hours = r["total_tokens"] / tokens_per_s / 3600 * chips
            assert r["chip_hours"] == pytest.approx(chip_hours, rel=1e-9)
            assert r["on_demand_usd"] == pytest.approx(chip_hours * price["on_demand"], rel=1e-9)
            if "spot" in price:  # the shipped table has no Spot prices (they change daily); a user's may
                assert r["spot_usd"] == pytest.approx(chip_hours * price["spot"], rel=1e-9)
            else:
                assert r["spot_usd"] is None
    assert compiles[0][2] == 8 and "our contract" in pricing.lookup("v6e:2x4", "lab-region", str(user)).source


@pytest.mark.tpu
@pytest.mark.slow  # 4 compiles for a TPU topology: ~33 s of CPU on a loaded 2-core machine
def test_flops_of_a_step_with_loops_equal_its_unrolled_compile():
    """XLA's cost analysis counts a loop's body once: a scanned, microbatched, chunked step is counted from its
    unrolled twins at one and two rows per batch shard, extended to the batch: the unrolled step's at the full batch."""
    run = aot.load_run(["runs/demo.gin", "models/tiny.gin"],
                       ["BATCH_SIZE=16", "SEQ_LEN=64", "TrainConfig.microbatches=2", "TrainConfig.loss_chunk=32"])
    assert aot.has_loops(run)
    step = aot.compile_step(run, "v5e:2x2")
    flops = aot.step_flops(step)
    full = aot.load_run(["runs/demo.gin", "models/tiny.gin"], ["BATCH_SIZE=16", "SEQ_LEN=64",
                                                               "ModelConfig.scan_layers=False"])
    assert not aot.has_loops(full)
    unrolled = aot.cost_flops(aot.compile_step(full, "v5e:2x2").compiled)
    assert flops == pytest.approx(unrolled, rel=1e-4)
    assert aot.cost_flops(step.compiled) < 0.9 * unrolled           # what the step's own analysis would have said


@pytest.mark.tpu
@pytest.mark.slow  # 1 compile for a TPU topology: ~15 s on a loaded 2-core machine
def test_a_priced_launch_dry_run_is_steps_times_flops_over_peak_times_price(tmp_path, monkeypatch, capsys):
    """`launch.tpu --dry_run --price` in the zone's region of a user's price table: chip-hours and dollars by hand
    from the compiled step's FLOPs; nothing created."""
    from launch import tpu

    compiled = []
    real = aot.compile_step
    monkeypatch.setattr(aot, "compile_step", lambda *a, **k: compiled.append(real(*a, **k)) or compiled[-1])
    user = tmp_path / "prices.toml"
    user.write_text('source = "our contract"\n[v5e.lab-west1]\non_demand = 10.0\nspot = 3.0\n')
    assert tpu.main(["--name=priced", "--zone=lab-west1-b", "--accelerator_type=v5litepod-4", "--dry_run", "--price",
                     "--mfu=0.25", f"--prices={user}", "--", "--gin_file=runs/demo.gin", "--gin_file=models/tiny.gin",
                     "--gin.MODEL_DIR=gs://b/priced", "--gin.TRAIN_STEPS=1000", "--gin.BATCH_SIZE=16",
                     "--gin.SEQ_LEN=64", "--gin.ModelConfig.scan_layers=False"]) == 0
    out = capsys.readouterr().out
    [step] = compiled                                   # no loops: its own cost analysis is the step's FLOPs
    chip_hours = 1000 * aot.cost_flops(step.compiled) / (197e12 * 0.25) * 4 / 3600
    line = next(line for line in out.splitlines() if line.startswith("launch.tpu: estimated 1,000 steps x "))
    assert f"{chip_hours:.4g} chip-hours, ${chip_hours * 10:.3g} on demand, ${chip_hours * 3:.3g} Spot" in line
    assert "our contract" in line and "fits" in line
    assert out.splitlines()[-1] == "launch.tpu: dry run: nothing was created and nothing ran"


@pytest.mark.parametrize("prog", ["sweep.py", "experiments.durability"])
def test_without_the_tpu_extra_a_priced_dry_run_is_one_line_and_exit_3(prog, sweep_file, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
    if prog == "sweep.py":
        code = sweep.main([str(sweep_file), "--dry_run", "--topology=v5p:2x2x1"])
    else:
        from experiments import durability

        code = durability.main(["sweeps/durability_demo.toml", "--dry_run", "--topology=v5p:2x2x1"])
    assert code == 3
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{'python -m ' * (prog != 'sweep.py')}{prog}: error: --topology needs the TPU extra (libtpu is not installed): pip install -r requirements-tpu.txt"]


def test_a_price_table_that_does_not_hold_names_its_file_and_key(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text("[v5p.us-east5]\non_demand = 'four'\n")
    with pytest.raises(ValueError, match=rf"{bad}: \[v5p.us-east5\] prices must be non-negative numbers"):
        pricing.lookup("v5p:2x2x1", None, str(bad))
    with pytest.raises(ValueError, match="--region mars-1: no v5p price there; regions priced: us-east5"):
        pricing.lookup("v5p:2x2x1", "mars-1")
    assert pricing.lookup("v5p:2x2x1").cost(2.0) == (8.4, None)  # no Spot price shipped


def test_the_report_sets_each_runs_estimate_beside_its_goodput(sweep_file):
    """A run with a goodput.json of two attempts on the priced chips: its report row holds the estimated and the
    actual time and cost; a run that has not run holds its estimate alone. The dry run's table sums each arm."""
    from experiments import estimate, plan, priced, sweep_report

    s = plan.load(sweep_file)
    done, waiting = s.runs[0], s.runs[1]
    attempts = [{"wall_s": 30.0, "devices": 4, "device_kind": "TPU v5", "steps": {"productive": 2, "recomputed": 0},
                 "seconds": {"productive": 20.0, "compile": 10.0}},
                {"wall_s": 60.0, "devices": 4, "device_kind": "TPU v5", "steps": {"productive": 1, "recomputed": 1},
                 "seconds": {"productive": 40.0, "compile": 20.0}}]
    s.run_dir(done).mkdir(parents=True)
    (s.run_dir(done) / "goodput.json").write_text(json.dumps({"attempts": attempts}))
    key = estimate.shape_key(s.configs[done.model])
    price = pricing.Price("v5p", "us-east5", 4.0, 2.0, "test")
    est = estimate.Estimate(
        shapes={key: estimate.StepTime(10.0, "compiled", "", chips=4, fits=True, device_kind="TPU v5")},
        runs={r.name: (key, r.train_steps * 10.0) for r in s.runs}, describe={key: ""}, price=price)
    rows = {r["run"]: r for r in sweep_report.run_rows(s, {}, {}, est)}
    row = rows[done.name]
    assert row["est_time_s"] == 30.0 and row["est_cost_usd"] == pytest.approx(30.0 * 4 / 3600 * 4.0)
    assert row["actual_time_s"] == 90.0 and row["goodput"] == pytest.approx(60 / 90, abs=1e-4)
    assert row["actual_cost_usd"] == pytest.approx(90.0 * 4 / 3600 * 4.0)
    assert priced.time_cell(row) == "30s / 1.5min (67%); $0.133 / $0.4"
    assert "actual_time_s" not in rows[waiting.name] and priced.time_cell(rows[waiting.name]).startswith("30s / -")
    # The dry run's table: per arm (its seeds' runs) the chip-hours and cost.
    text = plan.format_plan(s, est)
    arm = [r for r in s.runs if r.arm == done.arm]
    hours = sum(r.train_steps * 10.0 * 4 / 3600 for r in arm)
    assert f"arm {done.arm} ({len(arm)} runs): {hours:.4g} chip-hours, {estimate.usd(hours * 4.0)} on demand, " \
           f"{estimate.usd(hours * 2.0)} Spot" in text
