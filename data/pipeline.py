"""`build(config) -> Pipeline`: sources -> tokens -> packed rows -> block mixture -> batches, with stats.

Data shards: the global batch of `batch_size` rows is `num_shards` contiguous slices of `batch_size/num_shards` rows.
Shard j owns part j of every component's records (by byte range, file, row group or index: data.sources), opens and
validates only those, packs them and mixes its rows by the block schedule on its own. A JAX process builds only the
shards of its slice of the global batch, so it reads and parses only its own documents, per-process outputs are
disjoint and, stacked in process order, equal the batches of one process building every shard.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import zlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from data.config import Component, MixtureConfig
from data.documents import DocumentEncoder
from data.mixture import BlockMixIterDataset, Schedule
from data.packing import PackedRowsIterDataset
from data.sources import ScanReport, open_source
from data.tokenize import TextEncoder

ROW_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


def component_seed(seed: int, name: str) -> int:
    """A stable per-component seed (independent of the other components, so adding one changes nobody's order)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


class EpochMapDataset(grain.MapDataset):
    """A document source (one data shard's), reshuffled every epoch (seeded), repeated `epochs` times
    (None = forever), each document mapped by `fn`. Element i is epoch i // n, document perm_epoch[i % n].

    One Grain node instead of source/slice/shuffle/repeat/map: each of those costs per-element bookkeeping.
    """

    def __init__(self, source, fn, *, seed: int, epochs: int | None, shuffle: bool):
        super().__init__()
        self._source, self._fn = source, fn
        self._seed, self._epochs, self._shuffle = seed, epochs, shuffle
        self._perm: tuple[int, np.ndarray | None] = (-1, None)

    @property
    def documents_per_epoch(self) -> int:
        """Documents of this shard (one epoch)."""
        return len(self._source)

    def __len__(self) -> int:
        return self.documents_per_epoch * self._epochs if self._epochs else sys.maxsize

    def __str__(self) -> str:
        return f"EpochMapDataset(documents={self.documents_per_epoch}, epochs={self._epochs})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        epoch, k = divmod(index, self.documents_per_epoch)
        if self._shuffle:
            if self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self._seed, epoch]).permutation(self.documents_per_epoch))
            k = self._perm[1][k]
        return self._fn(self._source[int(k)])


class DataStateMismatch(ValueError):
    """A saved data iterator state does not fit this pipeline (another shard count, or a state kept per process)."""


class _ShardBatchIterDataset(grain.IterDataset):
    """Stacks `rows` rows from each shard's row stream, shard after shard: batch arrays [len(shards) * rows, ...]."""

    def __init__(self, shards: Sequence[grain.IterDataset], rows: int, num_shards: int, ids: Sequence[int]):
        super().__init__(list(shards))
        self._rows, self._num_shards, self._ids = rows, num_shards, tuple(ids)

    def __iter__(self) -> "_ShardBatchIterator":
        return _ShardBatchIterator([iter(p) for p in self._parents], self._rows, self._num_shards, self._ids)


class _ShardBatchIterator(grain.DatasetIterator):
    """State: {"num_shards": S, "shards": {shard id: that shard's state}}. set_state takes any state holding this
    process's shards (e.g. every process's shards merged: merge_process_states)."""

    def __init__(self, parents: list[grain.DatasetIterator], rows: int, num_shards: int, ids: tuple[int, ...]):
        super().__init__(parents)
        self._rows, self._num_shards, self._ids = rows, num_shards, ids

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [next(p) for p in self._parents for _ in range(self._rows)]
        batch = {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}
        batch["component"] = np.array([r["component"] for r in rows], dtype=np.int32)
        batch["_documents"] = np.array([r["_documents"] for r in rows], dtype=np.int32)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"num_shards": self._num_shards,
                "shards": {str(j): p.get_state() for j, p in zip(self._ids, self._parents)}}

    def set_state(self, state: dict[str, Any]) -> None:
        if state["num_shards"] != self._num_shards:
            raise DataStateMismatch(
                f"the data iterator state was saved with {state['num_shards']} data shards, but this run splits its "
                f"batches into {self._num_shards} (MixtureConfig.num_shards, by default data.config.default_num_shards"
                f" of the batch size); set --gin.MixtureConfig.num_shards={state['num_shards']} to continue its data "
                "order (on a number of processes that divides it)")
        missing = [j for j in self._ids if str(j) not in state["shards"]]
        if missing:
            raise DataStateMismatch(f"the data iterator state holds data shards {sorted(map(int, state['shards']))}, "
                                    f"not this process's {missing}")
        for j, p in zip(self._ids, self._parents):
            p.set_state(state["shards"][str(j)])


def merge_process_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One pipeline iterator state holding every data shard of `states` (what each process of a run saved): a
    pipeline built for any process count that divides the shard count restores it, each process taking its shards.
    Raises DataStateMismatch for states kept per process (Grain worker processes, MixtureConfig.worker_count > 0)."""
    try:
        (num_shards,) = {s["parent"]["num_shards"] for s in states}
        shards = {j: st for s in states for j, st in s["parent"]["shards"].items()}
        counts = {j: c for s in states for j, c in s["counts"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataStateMismatch(
            f"the data iterator state was saved per process by {len(states)} processes (Grain worker processes, "
            "MixtureConfig.worker_count > 0, keep their positions per process): resume it on "
            f"{len(states)} processes") from None
    return {"parent": {"num_shards": num_shards, "shards": shards}, "counts": counts}


class _StatsIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, names: Sequence[str], ids: Sequence[int], rows: int):
        super().__init__(parent)
        self._names, self._ids, self._rows = tuple(names), tuple(ids), rows

    def __iter__(self) -> "StatsIterator":
        return StatsIterator(iter(self._parent), self._names, self._ids, self._rows)


class StatsIterator(grain.DatasetIterator):
    """The pipeline's iterator: yields the batch dict and counts what it yielded, per data shard (rows
    [k * rows, (k + 1) * rows) of a batch are local shard k's), so the counts travel with their shards' positions
    when another number of processes resumes (merge_process_states). Counts are part of its state."""

    def __init__(self, parent: grain.DatasetIterator, names: Sequence[str], ids: Sequence[int], rows: int):
        super().__init__(parent)
        self._names, self._ids, self._rows = names, tuple(ids), rows
        self._counts = {j: self._zero() for j in self._ids}

    def _zero(self) -> dict[str, Any]:
        per = {n: 0 for n in self._names}
        return {"rows": dict(per), "tokens": dict(per), "documents": dict(per), "padding": 0, "batches": 0}

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        docs = batch.pop("_documents")
        real = (batch["segment_ids"] > 0).sum(axis=1)
        c, k = len(self._names), len(self._ids)
        slot = np.arange(len(real)) // self._rows * c + batch["component"]  # (local shard, component) of each row
        for key, values in (("rows", np.ones_like(real)), ("tokens", real), ("documents", docs)):
            sums = np.bincount(slot, values, minlength=k * c).reshape(k, c)
            for j, row in zip(self._ids, sums):
                for name, v in zip(self._names, row):
                    self._counts[j][key][name] += int(v)
        padding = self._rows * batch["segment_ids"].shape[1] - real.reshape(k, self._rows).sum(axis=1)
        for j, pad in zip(self._ids, padding):
            self._counts[j]["padding"] += int(pad)
            self._counts[j]["batches"] += 1
        return batch

    def counts(self) -> dict[str, Any]:
        """This process's counts: the sums over its shards (`batches` is the batches it yielded)."""
        total = self._zero()
        for shard in self._counts.values():
            for key in ("rows", "tokens", "documents"):
                for name, v in shard[key].items():
                    total[key][name] += v
            total["padding"] += shard["padding"]
        total["batches"] = next(iter(self._counts.values()))["batches"]
        return total

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(),
                "counts": {str(j): {k: (dict(v) if isinstance(v, dict) else v) for k, v in c.items()}
                           for j, c in self._counts.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        for j in self._ids:
            saved, mine = state["counts"][str(j)], self._zero()
            for key in ("padding", "batches"):
                mine[key] = int(saved[key])
            for key in ("rows", "tokens", "documents"):  # by name, so counts survive a change of components
                for name in self._names:
                    mine[key][name] = int(saved[key].get(name, 0))
            self._counts[j] = mine


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """component_names[i] is the component of `batch['component'] == i`; `iterator` yields this process's batches."""

    config: MixtureConfig
    component_names: tuple[str, ...]
    iterator: StatsIterator
    dataset: grain.IterDataset
    reports: dict[str, ScanReport]
    documents_per_epoch: dict[str, int]  # documents of each component in this process's shards
    encoder: TextEncoder
    data_shards: tuple[int, ...]  # this process's data shards, of num_shards
    num_shards: int

    def stats(self) -> dict[str, Any]:
        """Realized counts of this process's batches so far: per component rows, non-padding tokens, token share,
        documents started, epochs (documents / documents per epoch), filtered empty and skipped bad records, and the
        records this process parsed and bytes it read at start-up (its own data shards only); the padding fraction
        of all tokens."""
        c = self.iterator.counts()
        tokens = sum(c["tokens"].values())
        comps = {}
        for name in self.component_names:
            report = self.reports[name]
            comps[name] = {"rows": c["rows"][name], "tokens": c["tokens"][name],
                           "token_share": c["tokens"][name] / max(tokens, 1), "documents": c["documents"][name],
                           "epochs": c["documents"][name] / self.documents_per_epoch[name],
                           "empty_filtered": report.empty, "bad_records": len(report.bad),
                           "records_parsed": report.records_parsed, "bytes_read": report.bytes_read}
        all_tokens = tokens + c["padding"]
        return {"components": comps, "rows": sum(c["rows"].values()), "batches": c["batches"],
                "padding_fraction": c["padding"] / all_tokens if all_tokens else 0.0}


def _local_shards(config: MixtureConfig, process_index: int, process_count: int) -> tuple[int, range]:
    if not (0 <= process_index < process_count):
        raise ValueError(f"process_index={process_index} out of range for process_count={process_count}")
    shards = config.shards(process_count)
    per = shards // process_count
    return shards, range(process_index * per, (process_index + 1) * per)


def _open(component: Component, encoder: TextEncoder, config: MixtureConfig, shard: int, shards: int):
    """(random-access documents, per-document map fn, scan report) of data shard `shard` of one component."""
    if component.kind == "pretokenized":
        from data.pretokenize import open_pretokenized

        return open_pretokenized(component, config.tokenizer, shard, shards)
    doc_encoder = DocumentEncoder(component, encoder)
    source, report = open_source(component, doc_encoder.check, max_bad_records=config.max_bad_records, shard=shard,
                                 shards=shards, max_document_bytes=config.max_document_bytes)
    return source, doc_encoder, report


FILL_SAMPLE_ROWS = 256


def estimate_fill(source, fn, component: Component, config: MixtureConfig) -> float:
    """Mean fraction of non-padding tokens in a component's rows: exactly 1 for concat-then-split (rows are full), and
    for first-fit measured on the first FILL_SAMPLE_ROWS rows packed from the seeded first epoch of `source`, data
    shard 0 (the same on every process, so all agree on the row shares)."""
    if component.packing != "first_fit":
        return 1.0
    docs = EpochMapDataset(source, fn, seed=component_seed(config.seed, component.name), epochs=1,
                           shuffle=component.shuffle)
    it = iter(PackedRowsIterDataset(docs, component, config.seq_len))
    real = [int((row["segment_ids"] > 0).sum()) for row, _ in zip(it, range(FILL_SAMPLE_ROWS))]
    return sum(real) / (len(real) * config.seq_len)


def row_shares(token_shares: Sequence[float], fill: Sequence[float]) -> list[float]:
    """Row shares that realize the token shares when a component's rows hold `fill` * seq_len real tokens on average:
    rows_c proportional to share_c / fill_c."""
    raw = [s / f for s, f in zip(token_shares, fill)]
    return [r / sum(raw) for r in raw]


def build(config: MixtureConfig, *, process_index: int = 0, process_count: int = 1) -> Pipeline:
    """Validates every source (paths, bad records, empty components) up front, then wires the Grain pipeline."""
    shards, local = _local_shards(config, process_index, process_count)
    encoder = TextEncoder(config)
    components = config.active_components
    names = [c.name for c in components]
    rows_per_shard = config.batch_size // shards
    opened = {(c.name, j): _open(c, encoder, config, j, shards) for c in components for j in local}
    fill = {}
    for c in components:  # first-fit fill from shard 0 (opened here too when another process owns it)
        shard0 = opened.get((c.name, 0)) or (_open(c, encoder, config, 0, shards) if c.packing == "first_fit" else None)
        fill[c.name] = estimate_fill(shard0[0], shard0[1], c, config) if shard0 else 1.0
    stages = [(start * rows_per_shard, row_shares([w[n] for n in names], [fill[n] for n in names]))
              for start, w in config.weight_schedule()]
    per_epoch = {n: 0 for n in names}
    shard_streams = []
    for j in local:
        row_streams = []
        for c in components:
            source, fn, _ = opened[c.name, j]
            seed = component_seed(config.seed, c.name)
            if len(source) == 0:
                raise ValueError(f"component {c.name!r} has no documents in data shard {j} of {shards}; every shard "
                                 "needs at least one (use fewer MixtureConfig.num_shards or more documents)")
            docs = EpochMapDataset(source, fn, seed=seed, epochs=c.max_epochs, shuffle=c.shuffle)
            per_epoch[c.name] += docs.documents_per_epoch
            row_streams.append(PackedRowsIterDataset(docs, c, config.seq_len))
        schedule = Schedule.from_weights(stages, block_size=config.block_size, seed=config.seed, shard=j, names=names,
                                         end=config.train_steps and config.train_steps * rows_per_shard,
                                         allow_empty=config.allow_unrealized_shares)
        shard_streams.append(BlockMixIterDataset(row_streams, names=names, schedule=schedule,
                                                 on_exhausted=[c.on_exhausted for c in components],
                                                 max_epochs=[c.max_epochs for c in components],
                                                 rows_per_step=rows_per_shard))
    dataset = _ShardBatchIterDataset(shard_streams, rows_per_shard, shards, local)
    if config.worker_count:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags; programs without absl.app
            flags.FLAGS.mark_as_parsed()  # (train.py, tests) would otherwise fail with UnparsedFlagAccessError
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    if config.prefetch:  # below the stats iterator, so its counts are of the batches handed out
        dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=config.prefetch)
    dataset = _StatsIterDataset(dataset, names, local, rows_per_shard)
    reports = {n: functools.reduce(ScanReport.merge, (opened[n, j][2] for j in local)) for n in names}
    return Pipeline(config=config, component_names=tuple(names), iterator=iter(dataset), dataset=dataset,
                    reports=reports, documents_per_epoch=per_epoch, encoder=encoder, data_shards=tuple(local),
                    num_shards=shards)
