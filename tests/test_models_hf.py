"""Import parity against transformers for tiny random models of every supported architecture."""
from __future__ import annotations

import numpy as np
import pytest

from models import hf_io
from tests.test_models_util import ARCHS, build_hf, hf_logits, random_tokens


@pytest.fixture(scope="module", params=sorted(ARCHS))
def hf_model(request, tmp_path_factory):
    """(arch, folder, torch model): one HF build per architecture for the whole module."""
    out = tmp_path_factory.mktemp(request.param)
    return request.param, out, build_hf(request.param, out)


@pytest.mark.parametrize("scan", [True, False])
def test_load_pretrained_matches_transformers(hf_model, scan):
    arch, folder, torch_model = hf_model
    tokens = random_tokens(2, 24)
    model, config = hf_io.load_pretrained(folder, scan_layers=scan)
    assert config.scan_layers is scan
    got = np.asarray(model(tokens))
    assert got.dtype == np.float32 and got.shape == (2, 24, 128)
    np.testing.assert_allclose(got, hf_logits(torch_model, tokens), rtol=0, atol=1e-4)


def test_positions_are_used(hf_model):
    """RoPE runs at the given positions, not at the slot index."""
    _, folder, torch_model = hf_model
    tokens = random_tokens(1, 12, seed=1)
    positions = (3 * np.arange(12) + 7)[None].astype(np.int32)  # spacing changes relative offsets
    model, _ = hf_io.load_pretrained(folder)
    got = np.asarray(model(tokens, positions=positions))
    np.testing.assert_allclose(got, hf_logits(torch_model, tokens, positions), rtol=0, atol=1e-4)
    assert np.abs(got - np.asarray(model(tokens))).max() > 1e-3


@pytest.mark.parametrize("scan", [True, False])
def test_save_pretrained_reloads_in_transformers(hf_model, scan, tmp_path):
    import torch
    import transformers

    arch, folder, torch_model = hf_model
    model, _ = hf_io.load_pretrained(folder, scan_layers=scan)
    hf_io.save_pretrained(model, tmp_path, dtype="float32")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is type(torch_model)
    tokens = random_tokens(2, 24, seed=2)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(torch_model, tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, value):
    from safetensors.numpy import load_file, save_file

    build_hf("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][3, 2] = value
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointMismatchError, match=rf"tensor {name} holds 1 NaN/Inf value"):
        hf_io.load_pretrained(tmp_path)
