"""Probe sets scored on a training state's live parameters: no export, no reload.

Each set's pairs are read and encoded with the run's tokenizer once, and packed exactly as eval.probes packs them
(eval.scoring.plan: the same rows, so the same single compiled shape per set); every call then scores the sharded
parameters where they are, on every process of a pod (each process takes part in every forward pass and gets every
margin). With the run's own ModelConfig (its compute dtype) and the mesh it trains on, the margins are bit for bit
those eval.probes computes from the checkpoint of that step on that mesh; eval.probes on one device agrees up to
float summation order.

train.py reads the sets (`read_sets`) before the run does any work and hands `ProbeSets.scorer` to the trainer
(trainer.probes_in_loop), which decides when to call the scorer and what to log.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import tempfile

import jax
import numpy as np
from flax import nnx

import storage
from eval import chat, probe_pairs, scoring
from models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ProbeSets:
    """The pairs of TrainConfig.probe_sets and probe_control, read and checked before a run does any work.
    `pairs`/`files`/`digests`: by set name (the file's stem): its pairs (only the chat-style ones in chat mode), its
    path, the sha256 of its file; `control`: the control set's name or None."""
    pairs: dict[str, list[probe_pairs.Pair]]
    files: dict[str, str]
    digests: dict[str, str]
    control: str | None
    chat_mode: bool = False
    batch_size: int = 16

    def scorer(self, run, mesh: jax.sharding.Mesh, graphdef: nnx.GraphDef) -> "LiveScorer":
        """The sets' scorer for the run's model (its effective ModelConfig and graph definition) on `mesh`, with the
        run's tokenizer (copied as train.py copies it to MODEL_DIR/tokenizer: every process of a pod needs its own)."""
        from trainer import run_metadata

        with tempfile.TemporaryDirectory(prefix="docmix-probe-tokenizer-") as scratch:
            tokenizer = chat.load(run_metadata.copy_tokenizer(run.mixture.tokenizer, scratch))
        return LiveScorer(self, tokenizer, run.model, graphdef, mesh)


def read_sets(train) -> ProbeSets:
    """The ProbeSets of a TrainConfig; a missing file, a malformed record or two sets with one name is a ValueError
    or FileNotFoundError naming the file (and record)."""
    files = [*train.probe_sets, *([train.probe_control] if train.probe_control else [])]
    names = [pathlib.PurePosixPath(str(f)).stem for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"TrainConfig.probe_sets / probe_control: file names (stems) must be distinct, got {names}")
    pairs, digests = {}, {}
    for name, path in zip(names, files):
        local = storage.local_file(path)
        if not local.is_file():
            raise FileNotFoundError(f"TrainConfig.probe_sets: {path} does not exist")
        digests[name] = hashlib.sha256(local.read_bytes()).hexdigest()
        pairs[name] = probe_pairs.read_pairs(local)
        if train.probe_chat:
            pairs[name] = probe_pairs.chat_pairs(pairs[name])
            if not pairs[name]:
                raise ValueError(f"{path}: no chat-style pairs to score (TrainConfig.probe_chat)")
    return ProbeSets(pairs, dict(zip(names, files)), digests, names[-1] if train.probe_control else None,
                     train.probe_chat, train.probe_batch_size)


class LiveScorer:
    """`scorer(params) -> {set name: [pairs] margins}` (chosen - rejected, nats/token, float64) of every set, on the
    model `nnx.merge(graphdef, params)` of `config` on `mesh`. `names`, `control`, `digests`: the sets'."""

    def __init__(self, sets: ProbeSets, tokenizer: chat.ChatTokenizer, config: ModelConfig, graphdef: nnx.GraphDef,
                 mesh: jax.sharding.Mesh):
        self.names, self.control, self.digests = tuple(sets.pairs), sets.control, sets.digests
        self.graphdef, self.mesh = graphdef, mesh
        self.sizes, self.plans = {}, {}
        encode = probe_pairs.encode_chat_texts if sets.chat_mode else probe_pairs.encode_pair_texts
        for name, pairs in sets.pairs.items():
            items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
            try:
                encoded = [encode(tokenizer, p, c) for p, c in items]
                self.plans[name] = scoring.plan(encoded, config.max_position_embeddings, sets.batch_size,
                                                config.sliding_window)
            except ValueError as e:
                raise ValueError(f"{sets.files[name]}: {e}") from e
            self.sizes[name] = len(pairs)

    def __call__(self, params: nnx.State) -> dict[str, np.ndarray]:
        out = {}
        for name, plan in self.plans.items():
            scores = plan.scores([scoring.global_token_logprobs(self.graphdef, params, batch, self.mesh)
                                  for batch in plan.batches])
            n = self.sizes[name]
            out[name] = scores[:n] - scores[n:]
        return out
