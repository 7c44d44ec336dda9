"""save_pretrained details (sharding, dtype, tokenizer files, config fields) and load_pretrained error cases."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import hf_io
from tests.test_models_util import build_hf, random_tokens


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    build_hf("llama", out)
    return out


def test_sharded_export_and_import(llama_dir, tmp_path):
    model, config = hf_io.load_pretrained(llama_dir)
    (tmp_path / "tok").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "tok" / name).write_text(f"{name} contents")
    out = tmp_path / "out"
    hf_io.save_pretrained(model, out, max_shard_bytes=40_000, tokenizer_dir=tmp_path / "tok")
    index = json.loads((out / hf_io.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).stat().st_size <= 40_000 + 4096 for f in files)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["tie_word_embeddings"] is False
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == config.eos_token_id
    assert (out / "chat_template.jinja").read_text() == "chat_template.jinja contents"
    assert load_file(out / files[0])[next(iter(load_file(out / files[0])))].dtype.name == "bfloat16"
    reloaded, reloaded_config = hf_io.load_pretrained(out)
    assert reloaded_config == config
    tokens = random_tokens(1, 16)
    # bf16 export: the reloaded network equals the original up to bf16 rounding of the weights.
    np.testing.assert_allclose(np.asarray(reloaded(tokens)), np.asarray(model(tokens)), rtol=0, atol=0.05)


def test_tokenizer_dir_without_tokenizer_is_an_error(llama_dir, tmp_path):
    model, _ = hf_io.load_pretrained(llama_dir)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        hf_io.save_pretrained(model, tmp_path / "out", tokenizer_dir=tmp_path)


def _rewrite(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"missing tensor model.layers.1.mlp.up_proj.weight \(expected shape \(128, 64\)\)"),
    (lambda t: t.update({"model.layers.0.extra.weight": np.zeros((3,), np.float32)}),
     r"unexpected tensor model.layers.0.extra.weight \(shape \(3,\)\)"),
    (lambda t: t.update({"model.norm.weight": np.zeros((65,), np.float32)}),
     r"model.norm.weight has shape \(65,\) in the checkpoint but the config implies \(64,\)"),
])
def test_checkpoint_mismatch_errors(llama_dir, tmp_path, edit, message):
    _rewrite(llama_dir, tmp_path / "bad", edit)
    with pytest.raises(hf_io.CheckpointMismatchError, match=message):
        hf_io.load_pretrained(tmp_path / "bad")


def test_no_safetensors_is_an_error(tmp_path, llama_dir):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        hf_io.load_pretrained(tmp_path)


def test_config_errors_come_before_weights(llama_dir, tmp_path):
    from models.config import UnsupportedConfigError

    config = json.loads((llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedConfigError, match="GPT2LMHeadModel"):
        hf_io.load_pretrained(tmp_path)  # no weights in this folder: the config is rejected first


def test_tied_config_with_a_different_lm_head_is_an_error(llama_dir, tmp_path):
    (tmp_path / "model.safetensors").symlink_to(llama_dir / "model.safetensors")
    config = json.loads((llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(hf_io.CheckpointMismatchError, match="lm_head.weight differs"):
        hf_io.load_pretrained(tmp_path)
