"""The trainer's own frozen config dataclasses, validated on construction.

Every error names the field as `Class.field` (gin adds the configurable it was called from), so a bad
`--gin.KEY=VALUE` fails before anything compiles. These classes know nothing of gin; `trainer.config` registers them.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

SCHEDULES = ("constant", "warmup_cosine", "warmup_stable_decay")


def check_types(obj: Any) -> None:
    """Raises TypeError naming `Class.field` when a value does not match its annotation (ints are valid floats)."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if not _matches(value, hints[field.name]):
            raise TypeError(f"{type(obj).__name__}.{field.name}: expected {_type_name(hints[field.name])}, "
                            f"got {value!r} ({type(value).__name__})")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(k, key_t) and _matches(v, val_t) for k, v in value.items())
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a learning-rate schedule and global-norm clipping.

    `weight_decay_exclude`: substrings of a parameter's path (e.g. `layers/attn_norm/scale`) whose params get no decay.
    `mu_dtype`: storage dtype of Adam's first moment; None keeps the parameters' dtype (float32 masters). 'bfloat16'
    saves 2 bytes per parameter (16 GB for an 8B model) at little cost: mu is a running mean of gradients, each step
    adds (1 - b1) = 10% of a new gradient (well above bf16's 2^-8 relative rounding), and the rounding errors decay
    with b1, so they stay below 2^-8 / (1 - b1) ~ 4% of mu: a small change of step size, never a lost update. The
    second moment and the parameters stay float32: nu (b2 close to 1) moves by small relative increments that bf16
    would round away and sets the step size through its square root, and bf16 parameters lose whole updates.
    Schedules: `constant` (after warmup), `warmup_cosine` (cosine to `min_lr_ratio * learning_rate` at the last step),
    `warmup_stable_decay` (constant, then linear to `min_lr_ratio * learning_rate` over the last `decay_fraction`).
    `schedule_start`: 0, or the step at which a resumed run starts a new schedule phase (warmup, then the shape over
    the remaining TRAIN_STEPS - schedule_start steps); a resume with other settings than the checkpoint's needs it.
    """
    learning_rate: float = 3e-4
    schedule: str = "warmup_cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    weight_decay_exclude: tuple[str, ...] = ("norm", "bias", "embed")
    clip_norm: float | None = 1.0
    mu_dtype: str | None = None
    schedule_start: int = 0

    def __post_init__(self):
        check_types(self)
        name = "OptimizerConfig"
        _require(self.mu_dtype in (None, "float32", "bfloat16"), f"{name}.mu_dtype",
                 f"must be None, 'float32' or 'bfloat16', got {self.mu_dtype!r}")
        _require(self.schedule in SCHEDULES, f"{name}.schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(self.learning_rate > 0 and math.isfinite(self.learning_rate), f"{name}.learning_rate",
                 f"must be a positive finite number, got {self.learning_rate}")
        _require(self.warmup_steps >= 0, f"{name}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, f"{name}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(0 < self.decay_fraction <= 1, f"{name}.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        _require(0 <= self.b1 < 1, f"{name}.b1", f"must be in [0, 1), got {self.b1}")
        _require(0 <= self.b2 < 1, f"{name}.b2", f"must be in [0, 1), got {self.b2}")
        _require(self.eps > 0, f"{name}.eps", f"must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, f"{name}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.clip_norm is None or self.clip_norm > 0, f"{name}.clip_norm",
                 f"must be > 0 or None, got {self.clip_norm}")
        _require(self.schedule_start >= 0, f"{name}.schedule_start", f"must be >= 0, got {self.schedule_start}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing and Hugging Face export.

    Keeps the latest `keep_latest` checkpoints plus every step that is a multiple of `keep_every` (forever).
    """
    every: int = 100
    keep_latest: int = 3
    keep_every: int | None = None
    async_save: bool = True
    export_at_end: bool = True
    export_every: int | None = None
    export_dtype: str = "bfloat16"

    def __post_init__(self):
        check_types(self)
        name = "CheckpointConfig"
        _require(self.every > 0, f"{name}.every", f"must be > 0, got {self.every}")
        _require(self.keep_latest > 0, f"{name}.keep_latest", f"must be > 0, got {self.keep_latest}")
        _require(self.keep_every is None or self.keep_every > 0, f"{name}.keep_every",
                 f"must be > 0 or None, got {self.keep_every}")
        _require(self.export_every is None or self.export_every > 0, f"{name}.export_every",
                 f"must be > 0 or None, got {self.export_every}")
        _require(self.export_dtype in ("bfloat16", "float32"), f"{name}.export_dtype",
                 f"must be bfloat16 or float32, got {self.export_dtype!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run itself: where, how long, how big, and how it is laid out on devices.

    `batch_size` is global, in rows of `seq_len` tokens; it is split into `microbatches` accumulated with a scan.
    `loss_chunk`: compute the output logits and the loss at most `loss_chunk` sequence positions at a time (the
    largest divisor of `seq_len` not above it), so `[rows, seq_len, vocab]` float32 logits and their gradient never
    exist at once; None computes all logits in one go. Same loss up to float summation order; for large vocabularies it is what makes a step fit.
    `mesh` maps axis name -> size over `data`, `fsdp`, `tensor`; one size may be -1 (filled with the remaining devices).
    Multi-slice: `dcn_data` (the number of slices) multiplies the data axis across slices over DCN, so only
    data-parallel gradient reductions cross slices (models.sharding.make_mesh).
    `init_from`: a Hugging Face folder (has config.json) or a docmix run/step directory; ignored when `model_dir`
    already holds a checkpoint (the run resumes instead). `peak_flops`: per-device peak FLOP/s for MFU; None looks
    `hardware` up in trainer.metrics.PEAK_FLOPS (or measures this CPU's matmul peak). `async_metrics`: fetch a
    step's metrics (and check its loss) while the next step runs, so the devices never wait for the host; False
    finishes every step before taking the next batch (for debugging and the overlap benchmark).
    `allow_data_change`: resume even when the corpora's files differ from those the checkpoint was trained on
    (data.fingerprint: files added, removed, resized or changed), logging what changed; otherwise such a resume is
    refused (exit 2) naming the changes.
    `probe_sets`: paired probe sets (JSONL, as eval.probes reads them) scored on the live parameters at step 0, every
    `probe_every` steps and at the last step, with `probe_control` as the neutral control set, `probe_batch_size`
    rows per forward pass and, with `probe_chat`, in the tokenizer's chat template (trainer.probes_in_loop).
    """
    model_dir: str
    train_steps: int
    batch_size: int
    seq_len: int
    seed: int = 0
    microbatches: int = 1
    z_loss: float = 0.0
    loss_chunk: int | None = None
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    init_from: str | None = None
    log_every: int = 10
    eval_every: int | None = None
    eval_batches: int | None = None
    hardware: str | None = None
    peak_flops: float | None = None
    progress_bar: bool = True
    wandb_project: str | None = None
    async_metrics: bool = True
    allow_data_change: bool = False
    probe_sets: tuple[str, ...] = ()
    probe_control: str | None = None
    probe_every: int = 100
    probe_batch_size: int = 16
    probe_chat: bool = False

    def __post_init__(self):
        check_types(self)
        name = "TrainConfig"
        _require(bool(self.model_dir), f"{name}.model_dir", "must be a non-empty path")
        _require(self.train_steps > 0, f"{name}.train_steps", f"must be > 0, got {self.train_steps}")
        _require(self.batch_size > 0, f"{name}.batch_size", f"must be > 0, got {self.batch_size}")
        _require(self.seq_len > 1, f"{name}.seq_len", f"must be > 1, got {self.seq_len}")
        _require(self.microbatches > 0 and self.batch_size % self.microbatches == 0, f"{name}.microbatches",
                 f"must divide BATCH_SIZE={self.batch_size}, got {self.microbatches}")
        _require(self.loss_chunk is None or self.loss_chunk > 0, f"{name}.loss_chunk",
                 f"must be None or > 0, got {self.loss_chunk}")
        _require(self.z_loss >= 0, f"{name}.z_loss", f"must be >= 0, got {self.z_loss}")
        _require(set(self.mesh) <= {"data", "fsdp", "tensor", "dcn_data"}, f"{name}.mesh",
                 f"axes must be among data, fsdp, tensor, dcn_data, got {sorted(self.mesh)}")
        _require(all(v == -1 or v > 0 for v in self.mesh.values()) and list(self.mesh.values()).count(-1) <= 1,
                 f"{name}.mesh", f"sizes must be > 0 with at most one -1, got {self.mesh}")
        _require(self.mesh.get("dcn_data", 1) > 0, f"{name}.mesh",
                 f"dcn_data (the number of slices) must be >= 1, got {self.mesh.get('dcn_data')}")
        _require(self.log_every > 0, f"{name}.log_every", f"must be > 0, got {self.log_every}")
        _require(self.eval_every is None or self.eval_every > 0, f"{name}.eval_every",
                 f"must be > 0 or None, got {self.eval_every}")
        _require(self.eval_batches is None or self.eval_batches > 0, f"{name}.eval_batches",
                 f"must be > 0 or None (every held-out batch), got {self.eval_batches}")
        _require(self.peak_flops is None or self.peak_flops > 0, f"{name}.peak_flops",
                 f"must be > 0 or None, got {self.peak_flops}")
        _require(self.probe_every > 0, f"{name}.probe_every", f"must be > 0, got {self.probe_every}")
        _require(self.probe_batch_size > 0, f"{name}.probe_batch_size", f"must be > 0, got {self.probe_batch_size}")
        _require(not self.probe_control or bool(self.probe_sets), f"{name}.probe_control",
                 "a control set is compared with value sets: set TrainConfig.probe_sets too")
