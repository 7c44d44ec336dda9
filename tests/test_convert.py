"""trainer.convert: HF folder -> Orbax run dir -> HF folder, numerically the same network as transformers'."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer import convert
from models.config import ModelConfig
from models.sharding import make_mesh
from trainer import checkpoint, initialize

HF = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
          num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, max_position_embeddings=128, rms_norm_eps=1e-5,
          rope_theta=10000.0, bos_token_id=1, eos_token_id=0)
TOKENS = np.array([[1, 5, 77, 123, 299, 8, 42, 0, 3]], np.int64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import torch
    import transformers

    from trainer.demo_assets import demo_asset

    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("hf")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF)).save_pretrained(out)
    shutil.copyfile(f"{demo_asset('tokenizer')}/tokenizer.json", out / "tokenizer.json")
    return out


def hf_logits(path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.numpy()


def test_round_trip_matches_transformers(hf_dir, tmp_path):
    run_dir = tmp_path / "orbax"
    assert convert.main(["hf-to-orbax", "--hf_dir", str(hf_dir), "--out", str(run_dir)]) == 0
    assert (run_dir / "checkpoints" / "0" / "params").is_dir() and (run_dir / "tokenizer" / "tokenizer.json").is_file()
    model, config, tokenizer_dir = checkpoint.restore_model(run_dir)
    assert config.num_layers == 3 and not config.tie_embeddings and tokenizer_dir == run_dir / "tokenizer"
    reference = hf_logits(hf_dir)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS, jnp.int32))), reference, atol=1e-4)

    out = tmp_path / "hf_again"
    assert convert.main(["orbax-to-hf", "--ckpt", str(run_dir), "--out", str(out), "--dtype", "float32"]) == 0
    np.testing.assert_allclose(hf_logits(out), reference, atol=1e-5)
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    import exit_codes  # what the command line exits with (one-line error, exit 2)

    assert exit_codes.run(convert.main, "convert", ["hf-to-orbax", "--hf_dir", str(hf_dir), "--out", str(run_dir)]) \
        == exit_codes.USAGE  # never overwrites


def test_converted_dir_initialises_an_unrolled_run_but_cannot_be_resumed(hf_dir, tmp_path):
    from trainer import run_metadata

    run_dir = tmp_path / "orbax"
    convert.hf_to_orbax(hf_dir, run_dir)
    model, config, _ = checkpoint.restore_model(run_dir)
    wanted = ModelConfig.from_hf({**HF, "architectures": ["LlamaForCausalLM"], "model_type": "llama"},
                                 scan_layers=False)
    params, effective = initialize.load_params(run_dir, wanted, make_mesh(devices=jax.devices()[:1]))
    assert not effective.scan_layers
    unrolled = nnx.to_pure_dict(params)
    stacked = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(np.asarray(unrolled["layers"][2]["mlp"]["up_proj"]["kernel"]),
                                  np.asarray(stacked["layers"]["mlp"]["up_proj"]["kernel"][2]))
    _, _, _, meta = checkpoint.read_metadata(run_dir)
    with pytest.raises(run_metadata.CheckpointMismatch, match="init_from"):
        run_metadata.check(meta, meta, str(run_dir))


def hf_to_orbax(hf_dir, out) -> int:
    """The command line's exit code (errors are one line on stderr, exit_codes.run)."""
    import exit_codes

    return exit_codes.run(convert.main, "python -m trainer.convert",
                          ["hf-to-orbax", "--hf_dir", str(hf_dir), "--out", str(out)])


@pytest.mark.parametrize("make, named", [
    (lambda out: (out / "tokenizer").mkdir() or (out / "tokenizer" / "tokenizer.json").write_text("mine"),
     "tokenizer/tokenizer.json"),
    (lambda out: (out / "tokenizer").symlink_to(out.parent), "tokenizer (a symbolic link)"),
    (lambda out: (out / "checkpoints" / "7").mkdir(parents=True), "checkpoints/7"),
    (lambda out: (out / "checkpoints").write_text("mine"), "checkpoints (a file)"),
], ids=["tokenizer-file", "tokenizer-link", "checkpoints-folder", "checkpoints-file"])
def test_hf_to_orbax_overwrites_nothing_and_says_so_before_reading_weights(tmp_path, capsys, make, named):
    from tests.test_export_target import snapshot

    out = tmp_path / "out"
    out.mkdir()
    make(out)
    before = snapshot(out)
    assert hf_to_orbax(tmp_path / "no_such_hf_folder", out) == 2   # the target is checked before the weights
    err = capsys.readouterr().err
    assert named in err and "replaces nothing" in err and err.count("\n") == 1
    assert snapshot(out) == before


def test_hf_to_orbax_writes_beside_what_out_holds(hf_dir, tmp_path):
    out = tmp_path / "out"
    (out / "tokenizer").mkdir(parents=True)                 # empty folders it would make anyway
    (out / "checkpoints").mkdir()
    (out / "README.md").write_text("my notes")
    assert hf_to_orbax(hf_dir, out) == 0
    assert (out / "README.md").read_text() == "my notes"
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert checkpoint.restore_model(out)[1].num_layers == 3
