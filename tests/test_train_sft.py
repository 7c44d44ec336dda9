"""SFT: init from a Hugging Face folder, chat records with loss only on assistant tokens. The first step's loss must
equal transformers' cross-entropy on exactly the assistant tokens of the same batch (each packed conversation alone)."""
import argparse
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.test_train_resume import REPO, env

TINY_HF = dict(vocab_size=6000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=2048,
               rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=0, pad_token_id=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny LlamaForCausalLM with the demo tokenizer (which has a chat template), saved by transformers."""
    import torch
    import transformers

    from trainer.demo_assets import demo_asset

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF)).save_pretrained(out)
    tokenizer = demo_asset("tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(f"{tokenizer}/{name}", out / name)
    return out


def chat_records(n):
    return [{"messages": [{"role": "user", "content": f"What is {a} plus {a + 3}?"},
                          {"role": "assistant", "content": f"{a} plus {a + 3} is {2 * a + 3}."}]} for a in range(n)]


@pytest.mark.slow  # ~30 s on an idle 2-core machine: one train.py process
def test_sft_from_hf_trains_only_on_assistant_tokens(hf_dir, tmp_path):
    import torch
    import transformers

    from data import pipeline
    from trainer import config

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_records(40)))
    args = ["--gin_file=runs/sft.gin", f"--gin.MODEL_DIR={tmp_path / 'run'}",
            f"--gin.INIT_FROM={hf_dir}", f"--gin.SFT_FILES=('{data}',)", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2",
            "--gin.SEQ_LEN=64", "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.peak_flops=1e12",
            "--gin.CheckpointConfig.export_dtype='float32'",
            "--gin.model_from_init.runtime={}"]  # float32 compute, to compare with transformers in float32
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])

    # The same first batch, rebuilt from the same config.
    parsed = config.add_gin_flags(argparse.ArgumentParser()).parse_args(args)
    run = config.load(parsed.gin_file, parsed.gin_bindings)
    batch = next(pipeline.build(run.mixture).iterator)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    total, weight, assistant_only = 0.0, 0.0, True
    for tokens, seg, mask in zip(batch["tokens"], batch["segment_ids"], batch["loss_mask"]):
        for s in set(seg[seg > 0].tolist()):
            idx = np.flatnonzero(seg == s)
            with torch.no_grad():
                logits = hf(torch.from_numpy(tokens[idx][None].astype(np.int64))).logits[0].double()
            ce = torch.nn.functional.cross_entropy(logits[:-1], torch.from_numpy(tokens[idx][1:].astype(np.int64)),
                                                   reduction="none").numpy()
            w = mask[idx][1:]
            total += float((ce * w).sum())
            weight += float(w.sum())
            text = run_tokenizer(run).decode(tokens[idx][mask[idx] > 0].tolist())
            assistant_only &= "What is" not in text and "plus" in text
    assert 0 < weight < (batch["segment_ids"] > 0).sum()          # some tokens are targets, most are not
    assert assistant_only                                          # targets are the answers, never the questions
    np.testing.assert_allclose(first["loss"], total / weight, rtol=1e-5)
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()


def run_tokenizer(run):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(f"{run.mixture.tokenizer}/tokenizer.json")
