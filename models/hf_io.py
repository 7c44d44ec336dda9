"""Hugging Face safetensors import and export, without torch.

`load_pretrained` validates config.json and every tensor's name and shape (from the safetensors headers) before reading
any data, then reads tensor by tensor, by byte range, straight into (sharded) device arrays, from a local folder or
gs:// alike (no copy of the checkpoint is staged). Each process reads only the rows of each tensor that its own
devices hold under a row sharding of the file's layout (`_row_sharding`: rows are contiguous bytes, so that is one
ranged read per tensor and process), and XLA moves them into the model's layout and sharding. On a pod every host
thus reads about 1/hosts of the checkpoint; the host holds at most its rows of one parameter (for scanned layouts, of
one stacked parameter) beyond what is already on the devices. NaN/Inf values are counted on the devices, so every
process refuses the same tensor.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, Sharding, SingleDeviceSharding

import storage
from models import sharding
from models.config import ModelConfig
from models.hf_names import TensorMap, hf_shape, tensor_maps
from models.safetensors_read import TensorReader, read_header
from models.transformer import Transformer

log = logging.getLogger(__name__)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers that old checkpoints saved but that are derived, not learned: recomputed from the config.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointMismatchError(ValueError):
    """A safetensors checkpoint does not have exactly the tensors (names and shapes) the config implies."""


def read_config(hf_dir: str | pathlib.Path, **runtime: Any) -> ModelConfig:
    path = storage.Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json in the Hugging Face folder")
    return ModelConfig.from_hf(storage.read_json_object(path), **runtime)


def weight_files(hf_dir: str | pathlib.Path) -> dict[str, storage.Path]:
    """Tensor name -> safetensors file, from the index json (sharded) or the single file (local or gs://)."""
    hf_dir = storage.Path(hf_dir)
    if (hf_dir / INDEX_FILE).exists():
        index = hf_dir / INDEX_FILE
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index (a JSON object with 'weight_map'): {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to safetensors file names")
        return {name: hf_dir / file for name, file in weight_map.items()}
    if (hf_dir / SINGLE_FILE).exists():
        return {name: hf_dir / SINGLE_FILE for name in read_header(hf_dir / SINGLE_FILE)[0]}
    raise FileNotFoundError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors weights are loaded)")

def _validate(reader: TensorReader, maps: list[TensorMap], shapes: dict[tuple, tuple[int, ...]], config: ModelConfig):
    """Missing / unexpected / mis-shaped tensors -> CheckpointMismatchError naming each (before any data is read)."""
    expected: dict[str, tuple[int, ...]] = {}
    for tmap in maps:
        for name in tmap.hf_names(config.num_layers):
            expected[name] = hf_shape(tmap, shapes[tmap.path])
    present = set(reader.files)
    missing = sorted(set(expected) - present)
    unexpected = sorted(n for n in present - set(expected)
                        if not n.endswith(DERIVED_SUFFIXES) and not (config.tie_embeddings and n == "lm_head.weight"))
    problems = [f"missing tensor {n} (expected shape {expected[n]})" for n in missing]
    problems += [f"unexpected tensor {n} (shape {reader.shape(n)}) not used by {config.architecture}" for n in unexpected]
    problems += [f"tensor {n} has shape {reader.shape(n)} in the checkpoint but the config implies {shape}"
                 for n, shape in expected.items() if n in present and reader.shape(n) != shape]
    if problems:
        raise CheckpointMismatchError("safetensors checkpoint does not match config.json:\n  " + "\n  ".join(problems))


def _per_layer_shapes(abstract: dict, config: ModelConfig) -> dict[tuple, tuple[int, ...]]:
    """Shape of one layer's (or the one global) parameter for every stacked-layout path."""
    shapes = {}
    for tmap in tensor_maps(config):
        if tmap.path[0] != "layers":
            shapes[tmap.path] = tuple(_get(abstract, tmap.path).shape)
        elif config.scan_layers:
            shapes[tmap.path] = tuple(_get(abstract, tmap.path).shape[1:])
        else:
            shapes[tmap.path] = tuple(_get(abstract, ("layers", 0) + tmap.path[1:]).shape)
    return shapes


def _get(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def load_pretrained(hf_dir: str | pathlib.Path, *, mesh: Mesh | None = None, param_dtype: str = "float32",
                    **runtime: Any) -> tuple[Transformer, ModelConfig]:
    """Loads a Hugging Face folder (config.json + safetensors; local or gs://) into a `Transformer`.

    `runtime` sets other ModelConfig runtime fields (compute_dtype, scan_layers, remat, attention). With `mesh`,
    every parameter is placed with the sharding its logical axes resolve to; otherwise on the default device. Every
    process must call it with the same arguments (the conversion to the model's sharding is collective).
    """
    config = read_config(hf_dir, param_dtype=param_dtype, **runtime)
    reader = TensorReader(weight_files(hf_dir))
    abstract_model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    abstract = nnx.to_pure_dict(abstract_state)
    maps = list(tensor_maps(config))
    shapes = _per_layer_shapes(abstract, config)
    _validate(reader, maps, shapes, config)

    specs = sharding.state_shardings(abstract_state, mesh) if mesh is not None else None
    spec_tree = nnx.to_pure_dict(specs) if specs is not None else None
    dtype = jnp.dtype(config.param_dtype)

    def load(tmap: TensorMap, names: list[str], path: tuple, stacked: bool) -> jax.Array:
        target = _get(spec_tree, path) if spec_tree is not None else SingleDeviceSharding(jax.devices()[0])
        return _load(reader, tmap, names, shapes[tmap.path], dtype, target, stacked)

    loaded = jax.tree.map(lambda _: None, abstract)
    for tmap in maps:
        names = tmap.hf_names(config.num_layers)
        if tmap.path[0] != "layers" or config.scan_layers:
            _set(loaded, tmap.path, load(tmap, names, tmap.path, stacked=tmap.path[0] == "layers"))
        else:
            for i, name in enumerate(names):
                path = ("layers", i) + tmap.path[1:]
                _set(loaded, path, load(tmap, [name], path, stacked=False))
    if config.tie_embeddings and "lm_head.weight" in reader.files:
        # A tied checkpoint that still stores lm_head.weight must store the embedding there; anything else is a
        # different network.
        embedding = _get(loaded, ("embed", "embedding"))
        head = _load(reader, TensorMap(("embed", "embedding"), "lm_head.weight", 0), ["lm_head.weight"],
                     embedding.shape, dtype, embedding.sharding, stacked=False)
        if not bool(jax.jit(jnp.array_equal)(head, embedding)):
            raise CheckpointMismatchError("config.json sets tie_word_embeddings=true but lm_head.weight differs from "
                                          "model.embed_tokens.weight")
    total = sum(reader.nbytes(name) for name in reader.used)
    log.info("%s: process %d of %d read %d of the %d tensor bytes it loads", hf_dir, jax.process_index(),
             jax.process_count(), reader.bytes_read, total)
    nnx.replace_by_pure_dict(abstract_state, loaded)
    return nnx.merge(graphdef, abstract_state), config


def _row_sharding(target: Sharding, shape: tuple[int, ...], row_dim: int) -> Sharding:
    """How the file's rows (axis `row_dim` of `shape`) are read: split over as many of the target mesh's axes as
    divide them (replicated over the rest), so the processes read disjoint row ranges."""
    if not isinstance(target, NamedSharding):
        return target
    mesh = target.mesh
    axes = [a for a in mesh.axis_names if mesh.shape[a] > 1]
    while axes and shape[row_dim] % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    spec: list[Any] = [None] * len(shape)
    spec[row_dim] = tuple(axes) or None
    return NamedSharding(mesh, P(*spec))


def _load(reader: TensorReader, tmap: TensorMap, names: list[str], shape: tuple[int, ...], dtype: Any,
          target: Sharding, stacked: bool) -> jax.Array:
    """The HF tensors `names` (one, or one per layer stacked on a leading axis) as one array of our layout (`shape`
    per layer) in `dtype`, placed with `target`.

    This process reads the row range its devices hold under `_row_sharding` (one read per tensor). When that is every
    row (one process, or a tensor too small to split), it converts them here and places the result; otherwise the
    array is assembled from every process's rows and a jitted conversion moves it into our layout and `target`."""
    lead = (len(names),) if stacked else ()
    read_shape = lead + hf_shape(tmap, shape)
    row_dim = len(lead)
    read_sharding = _row_sharding(target, read_shape, row_dim)
    spans = [index[row_dim].indices(read_shape[row_dim])[:2]
             for index in read_sharding.addressable_devices_indices_map(read_shape).values()]
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if (lo, hi) == (0, read_shape[row_dim]):
        out = np.empty(lead + shape, dtype)
        for i, name in enumerate(names):
            tensor = reader.tensor(name)
            if np.issubdtype(tensor.dtype, np.inexact):
                _refuse_nonfinite(reader, name, tensor.size - int(np.count_nonzero(np.isfinite(tensor))))
            (out[i] if stacked else out)[...] = tmap.to_ours(tensor, shape)
        return jax.device_put(out, target)

    rows = [reader.rows(name, lo, hi) for name in names]
    host = np.stack(rows) if stacked else rows[0]
    del rows

    def piece(index: tuple[slice, ...]) -> np.ndarray:
        start, stop = index[row_dim].indices(read_shape[row_dim])[:2]
        return host[index[:row_dim] + (slice(start - lo, stop - lo),) + index[row_dim + 1:]]

    array = jax.make_array_from_callback(read_shape, read_sharding, piece)
    del host
    out, bad = _to_ours(array, in_axes=bool(tmap.in_axes), stacked=stacked, shape=lead + shape, dtype=dtype,
                        sharding=target)
    for name, count in zip(names, np.asarray(bad).reshape(-1)):
        _refuse_nonfinite(reader, name, int(count))
    return out


def _refuse_nonfinite(reader: TensorReader, name: str, count: int) -> None:
    """A tensor holding NaN or Inf (a damaged checkpoint) is refused with an error naming it and its file."""
    if count:
        raise CheckpointMismatchError(f"{reader.files[name]}: tensor {name} holds {count} NaN/Inf value(s) of "
                                      f"{math.prod(reader.shape(name))}; refusing to load it")


@functools.partial(jax.jit, static_argnames=("in_axes", "stacked", "shape", "dtype", "sharding"))
def _to_ours(x: jax.Array, *, in_axes: bool, stacked: bool, shape: tuple[int, ...], dtype: Any, sharding: Sharding
             ) -> tuple[jax.Array, jax.Array]:
    """File layout -> ours (`hf_names`: ours = hf.T.reshape(shape), per layer) in `dtype` and `sharding`, and the
    NaN/Inf count per tensor (`[layers]` for a stacked x, `[1]` otherwise), replicated."""
    y = (jnp.swapaxes(x, -1, -2) if in_axes else x).reshape(shape).astype(dtype)
    bad = jnp.sum(~jnp.isfinite(x.reshape(x.shape[0] if stacked else 1, -1)), axis=1)
    replicated = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else sharding
    return jax.lax.with_sharding_constraint(y, sharding), jax.lax.with_sharding_constraint(bad, replicated)


# A docmix tokenizer folder: tokenizer.json (the `tokenizers` file every docmix command reads) and the files that
# configure it (special tokens, chat template). Exports copy these; generation_config.json is the model's, written
# from its config.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MAX_SHARD_BYTES = 5 * 10**9


def _hf_tensors(params: dict, config: ModelConfig):
    """Yields (hf_name, shape, read, TensorMap) in checkpoint order; `read()` gathers our per-layer array to the host
    only when the tensor is written, so a scanned model is never copied layer by layer on the devices up front."""
    for tmap in tensor_maps(config):
        for i, name in enumerate(tmap.hf_names(config.num_layers)):
            if tmap.path[0] != "layers":
                array, index = _get(params, tmap.path), ()
            elif config.scan_layers:
                array, index = _get(params, tmap.path), (i,)
            else:
                array, index = _get(params, ("layers", i) + tmap.path[1:]), ()
            shape = array.shape[len(index):]
            yield name, shape, (lambda a=array, idx=index: _to_host(a[idx] if idx else a)), tmap


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole value of `array` as a numpy array on this host.

    An array with shards on other processes is gathered collectively (replicated by a jitted reshard, then copied):
    every process must call this for the same arrays in the same order, or the processes hang.
    """
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def save_pretrained(model: Transformer, out_dir: str | pathlib.Path | None, *, dtype: str = "bfloat16",
                    tokenizer_dir: str | pathlib.Path | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Writes a Hugging Face folder: config.json, safetensors shards (+ index when more than one),
    generation_config.json, and the tokenizer files found in `tokenizer_dir`.

    Tensors are gathered to the host one at a time and written one shard at a time (host peak: one shard). Parameters
    with shards on other JAX processes are gathered collectively: every process calls this with the same model, one
    (process 0) with `out_dir` and the others with `out_dir=None`, which takes part in the gathers and writes nothing.
    """
    from safetensors.numpy import save_file

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"save_pretrained: dtype={dtype!r}; expected 'float32' or 'bfloat16'")
    tok_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    config = model.config
    out_dir = pathlib.Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np_dtype = jax.numpy.bfloat16 if dtype == "bfloat16" else np.float32
    itemsize = np.dtype(np_dtype).itemsize

    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in _hf_tensors(params, config):
        nbytes = int(np.prod(entry[1])) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: np.ascontiguousarray(tmap.to_hf(read()).astype(np_dtype)) for name, _, read, tmap in shard}
        if out_dir is not None:
            save_file(tensors, out_dir / file, metadata={"format": "pt"})
            storage.follow_umask(out_dir / file)  # safetensors renames a private (0600) temporary file into place
        weight_map.update({name: file for name in tensors})
        del tensors
    if out_dir is None:
        return
    if len(shards) > 1:
        total = sum(int(np.prod(shape)) * itemsize for shard in shards for _, shape, _, _ in shard)
        _write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    elif (out_dir / INDEX_FILE).exists():
        (out_dir / INDEX_FILE).unlink()  # a stale index from an earlier sharded export would shadow the new file
    _write_json(out_dir / "config.json", {**config.to_hf(), "torch_dtype": dtype, "dtype": dtype})
    generation = {k: v for k, v in config.to_hf().items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(out_dir / "generation_config.json", {**generation, "_from_model_config": True})
    for path in tok_files:
        storage.copy_file(path, out_dir / path.name)


def _tokenizer_files(tokenizer_dir: str | pathlib.Path) -> list[storage.Path]:
    """The tokenizer files of a local or gs:// folder."""
    found = [storage.Path(tokenizer_dir) / n for n in TOKENIZER_FILES if (storage.Path(tokenizer_dir) / n).exists()]
    if not any(p.name == "tokenizer.json" for p in found):
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json to export")
    return found


def _write_json(path: pathlib.Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
