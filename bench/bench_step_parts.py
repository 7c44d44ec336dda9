"""Where a CPU train step's time goes: docmix (JAX) and PyTorch/transformers timed part by part on the same config.

    python bench/bench_step_parts.py [--model smollm2_135m] [--reps 5] [--json out.json]

Parts, each run on its own, timed in one process for both frameworks alternating part by part (medians of `--reps`
rounds), random weights:
- body: embedding + all decoder layers + final norm, forward and backward (cotangent: fixed random `[B, S, E]`);
- head+loss: the output projection to the vocabulary and the masked next-token cross-entropy, forward and backward,
  from given hidden states (docmix: `trainer.loss`, all logits at once and `loss_chunk`-blocked);
- optimizer: global-norm clipping + AdamW update of every parameter (docmix: `trainer.optimizer`);
- step: the whole train step (docmix: the compiled program `train.py` runs; PyTorch: as in bench_train.py).
docmix's body is also timed with `remat='full'`, the attention with the XLA path it uses on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_train.py
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.bench_train import SHAPES, fake_batch  # noqa: E402
from bench.timing import interleaved_medians  # noqa: E402
from data import multihost  # noqa: E402
from models import layers  # noqa: E402
from models.sharding import make_mesh  # noqa: E402
from trainer import config, loss as loss_lib, program, state as state_lib  # noqa: E402


def jax_parts(run, batch: int, seq: int) -> tuple[jax.sharding.Mesh, dict[str, Callable[[], object]]]:
    """(the mesh to call them under, {part: a call that runs it once and waits})."""
    mesh = make_mesh(devices=jax.devices()[:1])
    out = {}
    for remat in ("none", "full"):
        r = dataclasses.replace(run, model=dataclasses.replace(run.model, remat=remat),
                                train=dataclasses.replace(run.train, batch_size=batch, seq_len=seq, microbatches=1))
        prog = program.build(r, mesh, num_components=1)
        state = state_lib.init_sharded(r.model, prog.tx, 0, mesh)
        with jax.set_mesh(mesh):
            data = multihost.global_batch(fake_batch(batch, seq, r.model.vocab_size), mesh, prog.batch_spec)
            cot = jnp.asarray(np.random.default_rng(1).standard_normal((batch, seq, r.model.hidden_size)), jnp.float32)

            def body(params, prog=prog, data=data, cot=cot):
                hidden, _ = nnx.merge(prog.graphdef, params).hidden(data["tokens"], data["segment_ids"],
                                                                     data["positions"])
                return jnp.vdot(hidden.astype(jnp.float32), cot)

            body_grad = jax.jit(jax.grad(body))
            out[f"body_remat_{remat}"] = lambda f=body_grad, s=state: jax.block_until_ready(f(s.params))
            if remat != "none":
                continue
            kernel = nnx.merge(prog.graphdef, state.params).output_kernel()
            total = jnp.sum(loss_lib.target_weights(data["segment_ids"], data["loss_mask"]))
            for chunk in (None, 64):
                def head(hidden, kernel, chunk=chunk):
                    if chunk is None:
                        logits = layers.projection("bse,ev->bsv", jnp.float32)(hidden[:, :-1], kernel)  # as the model
                        sums = loss_lib.predicting_loss_sums(logits, data, 1)
                    else:
                        sums = loss_lib.chunked_loss_sums(hidden, kernel, data, 1, chunk)
                    return loss_lib.objective(sums, r.train.z_loss, total)

                head_grad = jax.jit(jax.grad(head, argnums=(0, 1)))
                out[f"head_loss_chunk_{chunk}"] = lambda f=head_grad: jax.block_until_ready(f(cot, kernel))
            grads = jax.tree.map(jnp.ones_like, state.params)
            update = jax.jit(lambda g, s: prog.tx.update(g, s.opt_state, s.params))
            out["optimizer"] = lambda: jax.block_until_ready(update(grads, state))
            step = prog.train_step.lower(state, prog.example_batch(batch, seq)).compile()
            holder = [jax.tree.map(jnp.copy, state)]  # the step donates its state; the other parts read `state`

            def one_step():
                holder[0], metrics = step(holder[0], data)
                jax.block_until_ready(metrics)

            out["step"] = one_step
    return mesh, out


def torch_parts(model_config, batch: int, seq: int) -> dict[str, Callable[[], object]]:
    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    hf = dict(model_config.to_hf())
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.from_numpy(fake_batch(batch, seq, model_config.vocab_size)["tokens"].astype(np.int64))
    cot = torch.from_numpy(np.random.default_rng(1).standard_normal((batch, seq, model_config.hidden_size))
                           .astype(np.float32))
    ones = [torch.ones_like(p) for p in model.parameters()]  # the optimizer part's gradients (the others clear them)

    def body():
        model.zero_grad(set_to_none=True)
        (model.model(input_ids=tokens).last_hidden_state * cot).sum().backward()

    weight = model.get_output_embeddings().weight.detach().clone().requires_grad_(True)

    def head():
        hidden = cot.clone().requires_grad_(True)
        logits = F.linear(hidden, weight).float()
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()

    def clip_and_update():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def optimizer():
        for p, g in zip(model.parameters(), ones):
            p.grad = g
        clip_and_update()

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        clip_and_update()

    return {"body_remat_none": body, "head_loss_chunk_None": head, "optimizer": optimizer, "step": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", choices=list(SHAPES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    files = ["runs/demo.gin"] + ([] if args.model == "demo" else [f"models/{args.model}.gin"])
    run = config.load(files, ["MODEL_DIR = '/tmp/bench'"])
    batch, seq = SHAPES[args.model]
    mesh, ours = jax_parts(run, batch, seq)
    with jax.set_mesh(mesh):
        medians = interleaved_medians({"docmix": ours, "pytorch": torch_parts(run.model, batch, seq)}, args.reps)
    ours, theirs = medians["docmix"], medians["pytorch"]
    print(f"{args.model}, batch {batch}x{seq}, {jax.devices()[0].device_kind}, {os.cpu_count()} cores")
    print(f"{'part':<22}{'docmix s':>10}{'PyTorch s':>11}{'PyTorch/docmix':>16}")
    for part, seconds in ours.items():
        ref = theirs.get(part)
        ratio = f"{ref / seconds:.2f}x" if ref else "-"
        print(f"{part:<22}{seconds:>10.3f}{(f'{ref:.3f}' if ref else '-'):>11}{ratio:>16}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"model": args.model, "batch": batch, "seq": seq,
                                                       "docmix": ours, "pytorch": theirs}, indent=2) + "\n")


if __name__ == "__main__":
    import host_memory

    host_memory.use_huge_pages()  # as docmix's entry points run (both frameworks share the process)
    main()
