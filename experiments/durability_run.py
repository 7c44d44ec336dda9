"""Running the durability pipeline: every stage not yet finished is trained (experiments.runner), then the points of
each arm's curve are scored: in-loop probe records of the SFT runs, or their HF exports scored by eval.probes.

A point counts only once the stage that wrote it finished.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import storage
from experiments import durability, runner
from experiments.durability import Config, Stage
from experiments.evaluate import EvalSettings, evaluate


def job(c: Config, s: Stage, eval_every: int | None = None, *, export: bool = True) -> runner.Job:
    """export: the stage ends with an HF export (an SFT stage with in-loop points has none)."""
    args = [f"--gin_file={f}" for f in s.gin_files] + [f"--gin_bindings={b}" for b in s.bindings]
    args += [f"--gin_bindings=MODEL_DIR = {str(c.run_dir(s.name))!r}", f"--gin_bindings=TRAIN_STEPS = {s.train_steps}"]
    if eval_every:  # an HF export at every evaluation point; checkpoints (full train states) only to resume from
        args.append(f"--gin_bindings=CheckpointConfig.export_every = {eval_every}")
    if not export:
        args.append("--gin_bindings=CheckpointConfig.export_at_end = False")
    return runner.Job(s.name, c.run_dir(s.name), s.train_steps, tuple(args), export=export)


@dataclasses.dataclass(frozen=True)
class InLoopPoint:
    """A curve point scored in the loop: the probes.jsonl record of `step` in `run_dir` (trainer.probes_in_loop)."""
    run_dir: storage.Path
    step: int


def run(c: Config, launcher: str | None = None) -> dict[str, Any]:
    """Trains every stage that is not finished, returns {"status", "points", "schedules"}: points[arm][seed] =
    [(samples, HF folder or InLoopPoint, cache key), ...], samples 0 being the arm before SFT."""
    pre = {seed: durability.pre_sft_stages(c, seed) for seed in c.seeds}
    status: dict[str, dict] = {}
    midtrain = {s.name: s for seed in c.seeds for arm, s in pre[seed].items() if s and arm != "instruction"}
    status |= runner.run_all([job(c, s) for s in midtrain.values()], c.out_dir, launcher=launcher)
    status |= runner.run_all([job(c, pre[seed]["instruction"]) for seed in c.seeds], c.out_dir, launcher=launcher)
    schedules: dict[str, Any] = {}
    sft_jobs, points = [], {arm: {} for arm in c.arms}
    for seed in c.seeds:
        for arm in c.arms:
            stage = pre[seed][arm]
            init = durability.start_model(c, stage)
            if stage is not None and status.get(stage.name, {}).get("status") != "done":
                status[f"{arm}-sft-s{seed}"] = {"status": f"not run ({stage.name} did not finish)"}
                continue
            stage_sft, sched = durability.scheduled_sft_stage(c, arm, seed, init)
            per_eval, steps, samples = sched.steps_per_eval, sched.steps, sched.samples
            schedules[stage_sft.name] = {"steps_per_eval": per_eval, "steps": steps, "samples": samples}
            run_dir = c.run_dir(stage_sft.name)
            if c.in_loop:
                sft_jobs.append(job(c, stage_sft, export=False))
                points[arm][seed] = [(n, InLoopPoint(run_dir, step), f"{stage_sft.name}-{step}")
                                     for step, n in zip([0, *steps], [0, *samples])]
                continue
            sft_jobs.append(job(c, stage_sft, eval_every=per_eval))
            folder = lambda step: run_dir / (f"exports/{step}" if step % per_eval == 0 else "hf")  # noqa: E731
            points[arm][seed] = [(0, storage.Path(init), f"{arm}-before-s{seed}")] + \
                [(n, folder(step), f"{stage_sft.name}-{step}") for step, n in zip(steps, samples)]
    (c.out_dir / "schedules.json").write_text(json.dumps(schedules, indent=2) + "\n")
    status |= runner.run_all(sft_jobs, c.out_dir, launcher=launcher)
    return {"status": status, "points": points, "schedules": schedules}


def _finished(c: Config, folder: storage.Path | InLoopPoint, status: dict[str, dict]) -> bool:
    """A point counts once the stage that wrote it finished: an export (or in-loop record) of a stage that stopped
    (e.g. on a non-finite loss) may hold parameters no finite loss came from. Folders outside the runs (the base
    model) count as they are."""
    if isinstance(folder, InLoopPoint):
        return status.get(folder.run_dir.name, {}).get("status") == "done"
    runs = c.out_dir / "runs"
    if not folder.is_relative_to(runs):
        return folder.exists()
    return status.get(folder.relative_to(runs).parts[0], {}).get("status") == "done" and folder.exists()


def evaluate_points(c: Config, points: dict[str, dict[int, list]], s: EvalSettings, status: dict[str, dict]
                    ) -> dict[str, dict[int, list[tuple[int, dict]]]]:
    """Probe margins of every point of a finished stage: {arm: {seed: [(samples, margins by set), ...]}}, read from
    the SFT runs' probes.jsonl (in-loop points) or scored from the exports."""
    from trainer import probes_in_loop

    out: dict[str, dict[int, list]] = {}
    for arm, seeds in points.items():
        for seed, pts in seeds.items():
            for samples, folder, key in pts:
                if not _finished(c, folder, status):
                    continue
                if isinstance(folder, InLoopPoint):
                    record = {r["step"]: r for r in probes_in_loop.read(folder.run_dir)}.get(folder.step)
                    where = f"{folder.run_dir / probes_in_loop.FILE} step {folder.step}"
                    if record is None:
                        raise ValueError(f"{where}: no in-loop probe record (the run finished without it)")
                    margins = s.in_loop_margins(record, where)
                else:
                    print(f"evaluating {arm} seed {seed} at {samples} SFT samples", flush=True)
                    margins = evaluate(folder, s, c.out_dir / "eval" / f"{key}.json")["margins"]
                out.setdefault(arm, {}).setdefault(seed, []).append((samples, margins))
    return out
