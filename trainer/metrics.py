"""Training metrics: FLOPs and MFU, the log window, and the sinks (metrics.jsonl, TensorBoard, W&B).

metrics.jsonl holds one JSON object per logged step with the keys
  step, loss, lr, grad_norm, tokens_per_s, mfu, step_time_s, tokens (total), loss/NAME, tokens/NAME
and, on evaluation steps, eval/loss/NAME. Losses are means over the target tokens of the steps since the previous
log line (with log_every=1, exactly the step's loss); tokens/NAME count the non-padding tokens of component NAME seen
so far; tokens_per_s counts every position of every row (padding included), as MFU does.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import storage
from models.config import ModelConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per chip (vendor figures).
PEAK_FLOPS = {"tpu_v4": 275e12, "tpu_v5e": 197e12, "tpu_v5p": 459e12, "tpu_v6e": 918e12, "h100": 989e12}
_DEVICE_KINDS = (("v6", "tpu_v6e"), ("v5 lite", "tpu_v5e"), ("v5e", "tpu_v5e"), ("v5", "tpu_v5p"), ("v4", "tpu_v4"),
                 ("h100", "h100"))


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: every projection plus the output head (not the lookup)."""
    h, d = config.hidden_size, config.head_dim
    attn = h * d * (2 * config.num_heads + 2 * config.num_kv_heads)
    mlp = 3 * h * config.intermediate_size
    return config.num_layers * (attn + mlp) + h * config.vocab_size


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 per matmul parameter, plus causal attention (QK^T and AV over on
    average seq_len/2 keys: 2 matmuls x 2 FLOPs x seq_len/2 x heads x head_dim, times 3 for training)."""
    attention = 6 * config.num_layers * seq_len * config.num_heads * config.head_dim
    return 6 * matmul_params(config) + attention


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` timed fp32 [n, n] @ [n, n] matmuls on the first device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops_per_device(hardware: str | None, peak_flops: float | None) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): explicit value, named hardware, the device kind, or — on a
    device not in the table (CPU) — a timed fp32 matmul."""
    if peak_flops:
        return peak_flops, "TrainConfig.peak_flops"
    if hardware:
        if hardware not in PEAK_FLOPS:
            raise ValueError(f"TrainConfig.hardware={hardware!r}; known: {sorted(PEAK_FLOPS)}")
        return PEAK_FLOPS[hardware], hardware
    kind = jax.devices()[0].device_kind.lower()
    for pattern, name in _DEVICE_KINDS:
        if pattern in kind and jax.devices()[0].platform != "cpu":
            return PEAK_FLOPS[name], f"{name} ({kind})"
    return measure_matmul_peak(), f"measured fp32 matmul on {kind}"


class Window:
    """Accumulates step metrics between log lines (on the host, from fetched device values)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.steps, self.seconds = 0, 0.0
        self.loss_sum = self.weight = 0.0
        self.comp_loss = np.zeros(len(self.names))
        self.comp_weight = np.zeros(len(self.names))

    def add(self, m: dict[str, Any], seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.loss_sum += float(m["loss"]) * float(m["loss_weight"])
        self.weight += float(m["loss_weight"])
        self.comp_loss += np.asarray(m["component_loss_sum"], np.float64)
        self.comp_weight += np.asarray(m["component_weight"], np.float64)

    def record(self, step: int, last: dict[str, Any], tokens_seen: dict[str, int], tokens_per_step: int,
               flops_per_token: float, peak_total: float) -> dict[str, Any]:
        step_time = self.seconds / max(self.steps, 1)
        tokens_per_s = tokens_per_step / step_time if step_time > 0 else 0.0
        rec = {"step": step, "loss": self.loss_sum / max(self.weight, 1e-9), "lr": float(last["lr"]),
               "grad_norm": float(last["grad_norm"]), "tokens_per_s": tokens_per_s,
               "mfu": tokens_per_s * flops_per_token / peak_total, "step_time_s": step_time,
               "tokens": int(sum(tokens_seen.values()))}
        for i, name in enumerate(self.names):
            rec[f"loss/{name}"] = self.comp_loss[i] / self.comp_weight[i] if self.comp_weight[i] else None
            rec[f"tokens/{name}"] = int(tokens_seen[name])
        return rec


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter. tensorboardX imports torch whenever it is installed (~3 s at every start, only to
    accept torch tensors, which docmix never passes); unless this process already has torch, it is hidden for that
    import."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class Sinks:
    """metrics.jsonl (+ TensorBoard, + W&B when asked for and installed). Only process 0 writes.

    MODEL_DIR may be gs://: metrics.jsonl is rewritten on each record (objects cannot be appended to), and TensorBoard
    (which writes local files only) writes to a local folder that is copied to MODEL_DIR/tb on every record and at
    close (storage.LocalMirror)."""

    def __init__(self, model_dir: str | pathlib.Path, *, resume_step: int, run_name: str,
                 wandb_project: str | None = None, config: dict | None = None):
        self.active = jax.process_index() == 0
        self.path = storage.Path(model_dir) / "metrics.jsonl"
        self.tb = self.wandb = self.tb_dir = None
        if not self.active:
            return
        truncate_after(self.path, resume_step)
        SummaryWriter = _summary_writer_class()

        self.tb_dir = storage.LocalMirror(storage.Path(model_dir) / "tb")
        self.tb = SummaryWriter(str(self.tb_dir.local), purge_step=resume_step + 1 if resume_step else None)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("TrainConfig.wandb_project=%r but wandb is not installed; logging to metrics.jsonl and "
                            "TensorBoard only (pip install wandb)", wandb_project)
            else:
                self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow",
                                        id=run_name)

    def write(self, rec: dict[str, Any]) -> None:
        if not self.active:
            return
        storage.append_text(self.path, json.dumps(rec) + "\n")
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, rec["step"])
        if storage.is_remote(self.path):
            self.tb.flush()
            self.tb_dir.sync()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if k != "step" and v is not None}, step=rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb_dir.close()
        if self.wandb is not None:
            self.wandb.finish()


def truncate_after(path: storage.Path, step: int) -> None:
    """Drops records past `step` (written by a run that died after its last checkpoint, then redone on resume)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl."""
    return [json.loads(line) for line in storage.Path(path).read_text().splitlines() if line.strip()]
