"""eval.heldout: per-component held-out loss through the data pipeline, checked against a torch reference computed
document by document on the same packed batches."""
import json
import pathlib
import shutil

import numpy as np
import pytest

from data import demo
from data import pipeline as data_pipeline
from eval import heldout
from trainer import config as trainer_config
from trainer import demo_assets

SEQ_LEN, BATCH = 64, 4


@pytest.fixture(scope="module")
def assets():
    return demo.prepare(demo_assets.cache_dir())


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, assets):
    import torch
    import transformers

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_hf")
    config = transformers.LlamaConfig(vocab_size=6000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    for f in pathlib.Path(assets.tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


def _subset(src: pathlib.Path, dst: pathlib.Path, n: int) -> pathlib.Path:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[-n:]))
    return dst


def _torch_loss(hf_dir: pathlib.Path, batches: list[dict]) -> float:
    """Reference: every document of every row run on its own (its own positions), loss-masked CE summed."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, weight = 0.0, 0.0
    for b in batches:
        for row in range(b["tokens"].shape[0]):
            seg = b["segment_ids"][row]
            for sid in set(seg.tolist()) - {0}:
                idx = np.nonzero(seg == sid)[0]
                ids = torch.tensor(b["tokens"][row, idx][None].astype(np.int64))
                pos = torch.tensor(b["positions"][row, idx][None].astype(np.int64))
                with torch.no_grad():
                    logp = torch.log_softmax(model(ids, position_ids=pos).logits[0].double(), -1)
                ce = -logp[:-1].gather(1, ids[0, 1:, None])[:, 0].numpy()
                w = b["loss_mask"][row, idx][1:]
                total += float((ce * w).sum())
                weight += float(w.sum())
    return total / weight


@pytest.mark.slow  # ~35 s under load (tiny model, 3 components through the pipeline, torch reference)
def test_heldout_matches_reference_per_component(tiny_hf, assets, tmp_path, capsys):
    welfare = _subset(pathlib.Path(assets.welfare_jsonl), tmp_path / "welfare_heldout.jsonl", 6)
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": t}) + "\n" for t in demo.kjv_chapters(420)[-3:]))
    args = ["--model", str(tiny_hf), "--gin_file", "runs/demo.gin", f"--gin.SEQ_LEN={SEQ_LEN}",
            f"--gin.BATCH_SIZE={BATCH}", "--gin.MODEL_DIR=/tmp/unused", "--component", f"synthetic={welfare}",
            "--general", str(general), "--batches", "2", "--json"]
    result = heldout.main(args)
    assert json.loads(capsys.readouterr().out) == result
    assert json.loads((tiny_hf / "heldout.json").read_text()) == result
    comps = result["components"]
    # The demo config's held-out mixture (RunConfig.eval_mixture) supplies replay/synthetic/control held-out sets.
    assert set(comps) == {"replay", "synthetic", "control", "general"}
    assert "heldout" in comps["control"]["paths"][0]
    assert comps["synthetic"]["paths"] == [str(welfare)] and comps["general"]["paths"] == [str(general)]
    assert all(c["batches"] == 2 for c in comps.values())
    # A random-init model over a 6000-token vocabulary sits near log(6000) nats.
    assert all(abs(c["loss"] - np.log(6000)) < 0.5 for c in comps.values())
    mixture = trainer_config.load(["runs/demo.gin"], [f"SEQ_LEN = {SEQ_LEN}", f"BATCH_SIZE = {BATCH}",
                                                      "MODEL_DIR = '/tmp/unused'"]).eval_mixture
    for comp in heldout.heldout_components(mixture, {"synthetic": [str(welfare)]}, [str(general)]):
        if comp.name in ("replay", "control"):
            continue  # same code path as the others; skipping it keeps the torch reference short
        single = heldout.single_component_mixture(mixture, comp, BATCH)
        it = data_pipeline.build(single).iterator
        batches = [next(it) for _ in range(2)]
        seg = np.concatenate([b["segment_ids"] for b in batches])
        mask = np.concatenate([b["loss_mask"] for b in batches])
        targets = mask[:, 1:] * (seg[:, 1:] == seg[:, :-1]) * (seg[:, 1:] > 0)
        assert comps[comp.name]["target_tokens"] == int(targets.sum())
        assert comps[comp.name]["loss"] == pytest.approx(_torch_loss(tiny_hf, batches), abs=1e-4)


def test_bad_component_override_is_named(tiny_hf):
    with pytest.raises(ValueError, match=r"--component names \['nope'\]"):
        heldout.main(["--model", str(tiny_hf), "--gin_file", "runs/demo.gin", "--gin.MODEL_DIR=/tmp/unused",
                      "--component", "nope=x.jsonl"])
    with pytest.raises(ValueError, match="expected NAME=PATH"):
        heldout.main(["--model", str(tiny_hf), "--gin_file", "runs/demo.gin", "--gin.MODEL_DIR=/tmp/unused",
                      "--component", "synthetic"])
