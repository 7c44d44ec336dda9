"""Run by the tests as several processes (tests/multiproc.py's flags): load a Hugging Face folder (local or gs://)
onto a mesh over every process's devices, as train.py loads INIT_FROM, and save the whole parameters (gathered) to
an .npz from process 0.

    python -m tests.load_sharded --hf_dir gs://bucket/hf --out params.npz --distributed --coordinator_address=... \
        --num_processes=2 --process_id=0
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    from models import hf_io
    from models.sharding import make_mesh

    if args.distributed:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    model, _ = hf_io.load_pretrained(args.hf_dir, mesh=make_mesh())
    params = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    gathered = {jax.tree_util.keystr(path): np.asarray(multihost_utils.process_allgather(x, tiled=True))
                for path, x in params}
    if jax.process_index() == 0:
        np.savez(args.out, **gathered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
