"""AdamW with a learning-rate schedule, global-norm clipping and a weight-decay mask chosen by parameter path."""
from __future__ import annotations

from typing import Any

import jax
import optax

from trainer.run_config import OptimizerConfig


def schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step (0-based): linear warmup from 0, then the configured shape.

    With `config.schedule_start` = s > 0 (a new phase when resuming at step s), the schedule runs over steps
    [s, total_steps) as it would over a run of total_steps - s steps.
    """
    start = config.schedule_start
    if start >= total_steps:
        raise ValueError(f"OptimizerConfig.schedule_start={start} must be below TRAIN_STEPS={total_steps}")
    if start:
        phase = _schedule(config, total_steps - start)
        return lambda count: phase(count - start)
    return _schedule(config, total_steps)


def _schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak, end = config.learning_rate, config.learning_rate * config.min_lr_ratio
    warmup = min(config.warmup_steps, total_steps)
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else None
    if config.schedule == "constant":
        rest = optax.constant_schedule(peak)
    elif config.schedule == "warmup_cosine":
        rest = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=config.min_lr_ratio)
    else:  # warmup_stable_decay: hold the peak, then decay linearly over the last decay_fraction of the run
        decay = max(int(round(config.decay_fraction * total_steps)), 1)
        stable = max(total_steps - warmup - decay, 0)
        rest = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)],
                                    [stable])
    return optax.join_schedules([warm, rest], [warmup]) if warm is not None else rest


def decay_start(config: OptimizerConfig, total_steps: int) -> int:
    """The first step of the decay phase of a 'warmup_stable_decay' schedule over `total_steps` steps (after its
    schedule_start): from it the learning rate falls linearly to min_lr_ratio x peak at the last step. Other schedules
    have no separate decay phase (a cosine decays from the end of its warm-up): ValueError."""
    if config.schedule != "warmup_stable_decay":
        raise ValueError(f"OptimizerConfig.schedule={config.schedule!r} has no decay phase of its own; a schedule "
                         "paired with it needs OptimizerConfig.schedule = 'warmup_stable_decay'")
    phase = total_steps - config.schedule_start
    decay = max(int(round(config.decay_fraction * phase)), 1)
    return config.schedule_start + max(phase - decay, min(config.warmup_steps, phase))


def warmup_note(config: OptimizerConfig, total_steps: int) -> str | None:
    """A warning when the run's schedule phase (TRAIN_STEPS - schedule_start steps) is shorter than its warm-up: the
    warm-up is then cut to the phase, so the learning rate only rises and never reaches its peak. None otherwise."""
    phase = total_steps - config.schedule_start
    if config.warmup_steps <= phase:
        return None
    return (f"the run's {phase} steps are shorter than its learning-rate warm-up (OptimizerConfig.warmup_steps = "
            f"{config.warmup_steps}): the warm-up is cut to {phase} steps, so the learning rate only rises, to "
            f"{(phase - 1) / phase:.0%} of OptimizerConfig.learning_rate, and never follows the "
            f"{config.schedule!r} shape; lower OptimizerConfig.warmup_steps or raise TRAIN_STEPS")


def decay_mask(params: Any, exclude: tuple[str, ...]) -> Any:
    """A pytree of bools like `params`: True where weight decay applies (path contains none of `exclude`)."""
    def keep(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path).lower()
        return not any(word.lower() in name for word in exclude)

    return jax.tree_util.tree_map_with_path(keep, params)


def make(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (if set) then AdamW on `schedule(config, total_steps)` with the path-based decay mask.

    Moments are kept in the parameters' dtype (float32 masters), the first moment in `config.mu_dtype` if set."""
    adamw = optax.adamw(schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mu_dtype=config.mu_dtype,
                        mask=lambda params: decay_mask(params, config.weight_decay_exclude))
    if config.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
