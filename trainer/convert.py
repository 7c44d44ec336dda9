"""Convert between Hugging Face folders and docmix's Orbax checkpoint layout (the one train.py writes).

    python -m trainer.convert hf-to-orbax --hf_dir /path/llama-3.1-8b --out runs/llama8b_init
    python -m trainer.convert orbax-to-hf --ckpt runs/demo [--step 300] --out runs/demo_hf [--dtype float32]
                                          [--overwrite]

Every path may be local or gs:// (a bucket), in and out.

hf-to-orbax writes a run-style directory: OUT/checkpoints/0/{params,metadata} (parameters in the stacked layout) and
OUT/tokenizer/. OUT may hold other things, but those two must be absent or empty folders: nothing is overwritten.
Use it with `--gin.TrainConfig.init_from=OUT` or any tool that reads docmix runs (restore_model).
orbax-to-hf reads a run directory (latest checkpoint, or --step) or a step directory and writes config.json,
safetensors and the run's tokenizer files. OUT must be new or empty; an earlier export (docmix_export.json and
the files it lists, and no other file, folder or link) is replaced only with --overwrite. Nothing else is replaced.
A llama.cpp GGUF file becomes an HF folder with `python -m models.convert gguf-to-hf` (models/gguf.py).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import storage


def hf_to_orbax(hf_dir: str | pathlib.Path, out: str | pathlib.Path, *, param_dtype: str = "float32") -> storage.Path:
    """Returns the step directory written."""
    from models import hf_io
    from trainer import checkpoint, run_metadata

    hf_dir, out = storage.absolute(hf_dir), storage.absolute(out)
    _check_out(out, (checkpoint.CHECKPOINTS, "tokenizer"))
    model, config = hf_io.load_pretrained(hf_dir, param_dtype=param_dtype, scan_layers=True)
    has_tokenizer = (hf_dir / "tokenizer.json").is_file()
    step_dir = checkpoint.save_params(out, model, run_metadata.for_params_only(
        config, hf_dir if has_tokenizer else None, source=str(hf_dir)))
    if has_tokenizer:
        run_metadata.copy_tokenizer(hf_dir, out)
    return step_dir


def _check_out(out: storage.Path, parts: tuple[str, ...]) -> None:
    """hf-to-orbax replaces nothing: `out` must be a folder (or absent) whose `parts` are absent or empty folders;
    else FileExistsError names what is there (before any weights are read)."""
    if storage.kind(out) == "file":
        raise FileExistsError(f"{out} is a file; --out must be a new folder or one without {', '.join(parts)}")
    taken = []
    for name in parts:
        what = storage.kind(out / name)
        if what in ("file", "link"):
            taken.append(f"{name} ({'a symbolic link' if what == 'link' else 'a file'})")
        elif what == "folder":
            taken += [f"{name}/{entry}" for entry in storage.list_entries(out / name)]
    if taken:
        raise FileExistsError(f"{out} already holds {', '.join(taken[:5])}{', ...' if len(taken) > 5 else ''}; "
                              f"hf-to-orbax writes {' and '.join(p + '/' for p in parts)} there and replaces nothing: "
                              "choose a new or empty --out")


def orbax_to_hf(ckpt: str | pathlib.Path, out: str | pathlib.Path, *, step: int | None = None,
                dtype: str = "bfloat16", overwrite: bool = False) -> storage.Path:
    from trainer import checkpoint, export

    path = storage.absolute(ckpt)
    if step is not None:
        path = path / checkpoint.CHECKPOINTS / str(step)
    export.check_target(out, overwrite=overwrite)  # before reading any parameters
    model, _, tokenizer_dir = checkpoint.restore_model(path)
    return export.export(model, out, dtype=dtype, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                         source=str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="Hugging Face folder -> docmix Orbax run directory")
    a.add_argument("--hf_dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"))
    b = sub.add_parser("orbax-to-hf", help="docmix run/step directory -> Hugging Face folder")
    b.add_argument("--ckpt", required=True, help="run directory (latest checkpoint) or a checkpoints/<step> directory")
    b.add_argument("--step", type=int, default=None)
    b.add_argument("--out", required=True)
    b.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it holds an earlier export (only then)")
    args = parser.parse_args(argv)
    if args.command == "hf-to-orbax":  # errors: one line and an exit code from exit_codes.run
        done = hf_to_orbax(args.hf_dir, args.out, param_dtype=args.param_dtype)
    else:
        done = orbax_to_hf(args.ckpt, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {done}")
    return 0


if __name__ == "__main__":
    import exit_codes

    sys.exit(exit_codes.run(main, "python -m trainer.convert"))
