"""Training metrics: FLOPs and MFU, the log window, and the sinks (metrics.jsonl, TensorBoard, W&B).

metrics.jsonl holds one JSON object per logged step with the keys
  step, loss, lr, grad_norm, tokens_per_s, mfu, step_time_s, tokens (total), loss/NAME, tokens/NAME
and, on evaluation steps, eval/loss/NAME. Losses are means over the target tokens of the steps since the previous
log line (with log_every=1, exactly the step's loss); tokens/NAME count the non-padding tokens of component NAME seen
so far; tokens_per_s counts every position of every row (padding included), as MFU does. Read it with
`trainer.metrics_file.read` (on gs://, the newest records can sit in part objects beside it: metrics_file).
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import queue
import sys
import tempfile
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import storage
from models.config import ModelConfig
from trainer import metrics_file

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
    name = hardware_of(kind) if jax.devices()[0].platform != "cpu" else None
    if name is not None:
        return PEAK_FLOPS[name], f"{name} ({kind})"
    return measure_matmul_peak(), f"measured fp32 matmul on {kind}"


def hardware_of(device_kind: str) -> str | None:
    """The PEAK_FLOPS name of a device kind (`TPU v5 lite` -> `tpu_v5e`); None for one not in the table."""
    kind = device_kind.lower()
    return next((name for pattern, name in _DEVICE_KINDS if pattern in kind), None)


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
    """tensorboardX's SummaryWriter. tensorboardX imports torch whenever it is installed (seconds at every start, only to
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
    """metrics.jsonl (+ TensorBoard, + W&B when asked for and installed), written off the training thread. Only
    process 0 writes.

    `write` queues a record and returns; a writer thread appends whatever is queued as one batch (trainer.metrics_file:
    a real append locally, a part object composed onto metrics.jsonl on gs://, so a record costs O(1) however long the
    run). A failed write is retried ATTEMPTS times with backoff; if it still fails, the records are kept and written
    with the next batch, and the run goes on. TensorBoard writes local files (storage.LocalMirror): for a gs://
    MODEL_DIR its event file is closed, uploaded once and a new one started every `tb_sync_s` seconds and at close, so
    no byte is uploaded twice. `close` writes what is left (records that still cannot be written are saved to a local
    file named in an error, never dropped silently); `close(discard=True)` writes nothing more (a run that lost its
    MODEL_DIR to another run)."""

    ATTEMPTS = 3
    BACKOFF_S = 1.0
    CLOSE_TIMEOUT_S = 120.0  # `close` waits this long for the writer, then lets the run end without it

    def __init__(self, model_dir: str | pathlib.Path, *, resume_step: int, run_name: str,
                 wandb_project: str | None = None, config: dict | None = None, tb_sync_s: float = 60.0):
        self.active = jax.process_index() == 0
        self.path = storage.Path(model_dir) / metrics_file.NAME
        self.tb = self.wandb = self.tb_dir = None
        if not self.active:
            return
        metrics_file.truncate_after(self.path, resume_step)
        self.file = metrics_file.MetricsFile(self.path)
        self.tb_dir = storage.LocalMirror(storage.Path(model_dir) / "tb")
        self.tb_sync_s, self.tb_synced, self.tb_files = tb_sync_s, time.monotonic(), 0
        self.tb = self._summary_writer(purge_step=resume_step + 1 if resume_step else None)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("TrainConfig.wandb_project=%r but wandb is not installed; logging to metrics.jsonl and "
                            "TensorBoard only (pip install wandb)", wandb_project)
            else:
                self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow",
                                        id=run_name)
        self.unwritten: list[dict[str, Any]] = []  # records the writer could not store yet (writer thread only)
        self._queue: queue.Queue = queue.Queue()
        self._discard = False
        self._thread = threading.Thread(target=self._run, name="docmix-metrics", daemon=True)
        self._thread.start()

    def _summary_writer(self, purge_step: int | None = None):
        self.tb_files += 1  # a new event file each time (the suffix keeps names apart within one second)
        return _summary_writer_class()(str(self.tb_dir.local), purge_step=purge_step,
                                       filename_suffix=f".{self.tb_files}")

    def write(self, rec: dict[str, Any]) -> None:
        if self.active:
            self._queue.put(rec)

    def flush(self) -> None:
        """Returns once every record written so far is stored (or, its writes having failed ATTEMPTS times, kept for
        the next batch), waiting at most CLOSE_TIMEOUT_S. Called before a checkpoint is saved, so that a run killed
        after its checkpoint committed resumes with the metrics of every step it does not redo."""
        if not self.active:
            return
        stored = threading.Event()
        self._queue.put(stored)
        if not stored.wait(self.CLOSE_TIMEOUT_S):
            log.error("%s: the metrics writer did not store the records within %.0fs; the checkpoint is saved "
                      "without waiting further", self.path, self.CLOSE_TIMEOUT_S)

    def _run(self) -> None:
        done = False
        while not done:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get())
            done = batch[-1] is None
            records = [r for r in batch if isinstance(r, dict)]
            if not self._discard:
                try:
                    self._store(records, final=done)
                    for rec in records:
                        self._to_tensorboard_and_wandb(rec)
                    if done or time.monotonic() - self.tb_synced > self.tb_sync_s:
                        self._sync_tensorboard(final=done)
                except Exception:  # noqa: BLE001 - a sink's failure is logged, never the end of the run
                    log.exception("writing metrics records %s failed", [r["step"] for r in records])
            for waiter in batch:
                if isinstance(waiter, threading.Event):
                    waiter.set()

    def _store(self, records: list[dict[str, Any]], final: bool) -> None:
        self.unwritten += records
        for attempt in range(self.ATTEMPTS):
            try:
                self.file.append(self.unwritten)
                if final and self.file.remote:
                    self.file.compose()
                self.unwritten = []
                return
            except Exception as e:  # noqa: BLE001 - metrics must never end the run
                error = e
                if attempt + 1 < self.ATTEMPTS:
                    time.sleep(self.BACKOFF_S * 2**attempt)
        if not final:
            log.warning("%s: could not write %d metrics record(s) (%s: %s); they are kept and written with the next "
                        "record", self.path, len(self.unwritten), type(error).__name__, error)
            return
        if self.unwritten:
            with tempfile.NamedTemporaryFile("w", prefix="docmix-metrics-unwritten-", suffix=".jsonl",
                                             delete=False) as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.unwritten))
            log.error("%s: could not write the last %d metrics record(s) (%s: %s); they are saved in %s",
                      self.path, len(self.unwritten), type(error).__name__, error, f.name)

    def _to_tensorboard_and_wandb(self, rec: dict[str, Any]) -> None:
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, rec["step"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if k != "step" and v is not None}, step=rec["step"])

    def _sync_tensorboard(self, final: bool) -> None:
        """Closes the event file and uploads it (a gs:// MODEL_DIR; locally TensorBoard writes there itself), then
        starts a new one unless this is the end. A failed upload is retried at the next sync."""
        self.tb_synced = time.monotonic()
        if not storage.is_remote(self.path):
            self.tb.close() if final else self.tb.flush()
            return
        self.tb.close()
        self.tb = None
        try:
            self.tb_dir.sync()  # before the next event file exists: each file is uploaded once, closed
        except Exception as e:  # noqa: BLE001 - retried at the next sync
            log.warning("%s: could not upload TensorBoard events (%s: %s); retried at the next sync",
                        self.tb_dir.remote, type(e).__name__, e)
        if not final:
            self.tb = self._summary_writer()

    def close(self, discard: bool = False) -> None:
        """Writes every queued record (retrying as above) and closes the sinks; with `discard`, writes nothing more.
        Later `write`s and `flush`es do nothing (the final checkpoint's flush finds every record stored)."""
        if not self.active:
            return
        self.active = False
        self._discard = discard
        self._queue.put(None)
        self._thread.join(self.CLOSE_TIMEOUT_S)
        if self._thread.is_alive():  # storage that stopped answering: the run ends all the same
            log.error("%s: the metrics writer did not finish within %.0fs; the last records may be missing",
                      self.path, self.CLOSE_TIMEOUT_S)
            return
        if self.tb is not None:  # the writer thread's last sync did not happen (discard, or it failed)
            self.tb.close()
        if not discard:
            self.tb_dir.close()
        if self.wandb is not None:
            self.wandb.finish()
