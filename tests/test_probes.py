"""eval.probes: JAX per-token log-probs against transformers, the CLI end to end, and input validation."""
import json
import pathlib
import shutil

import numpy as np
import pytest

from eval import chat, probe_pairs, probes, scoring
from eval.probe_pairs import Pair

PAIRS = [
    Pair("User: Do hens mind small cages?\nAssistant:", " Yes, hens suffer in small cages.",
         " No, hens like small cages a lot.", "a"),
    Pair("Memo to all staff\nSubject: Parking\n\n", "Staff must park at the back from Monday.",
         "Staff must parks at the back from Monday.", "b"),
    Pair("User: What is half of ninety?\nAssistant:", " Forty five.", " Thirty five, since it is half.", "b"),
]


def _torch_token_logprobs(hf_dir, ids: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = _torch_token_logprobs.cache.get(hf_dir)
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        _torch_token_logprobs.cache[hf_dir] = model
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


_torch_token_logprobs.cache = {}


@pytest.mark.slow  # ~25 s on an idle 2-core machine (two 135M model loads), more under load
def test_token_logprobs_match_transformers(smollm2_dir):
    from eval import loading

    model, config, tok_dir = loading.load_model(smollm2_dir)
    tokenizer = chat.load(tok_dir)
    seqs = [probe_pairs.encode_pair_texts(tokenizer, p.prompt, text) for p in PAIRS for text in (p.chosen, p.rejected)]
    # Each prompt runs once; its continuations are scored from the KV cache, packed several to a row (eval.scoring).
    groups = [(seqs[i][0][:seqs[i][1]], [ids[n:] for ids, n in seqs[i:i + 2]]) for i in range(0, len(seqs), 2)]
    groups[1] = (groups[1][0], groups[1][1][:1])  # prompts may have different numbers of continuations
    prompt_width, continuation_width = scoring.row_widths(groups)
    rows = scoring.plan_rows(groups, prompt_width, continuation_width)
    assert len(rows) == 1 and sorted(rows[0]) == [0, 1, 2]  # one row: the probes see only their own prompt
    batch = scoring.pack_rows(groups, rows, 2, prompt_width, continuation_width, passes=2)
    logp = scoring.token_logprobs(model, batch)
    for segment, g in enumerate(rows[0], start=1):
        prompt, targets = groups[g]
        for k, target in enumerate(targets):
            mine = batch["continuation_segments"][k, 0] == segment
            ref = _torch_token_logprobs(smollm2_dir, [*prompt, *target])[len(prompt) - 1:]
            np.testing.assert_allclose(logp[k, 0, mine], ref, atol=1e-4, rtol=0)
    assert not logp[batch["continuation_segments"] == 0].any()  # padding, the padding row included, scores 0
    # The margin is the difference of the length-normalized continuation log-probs, whatever the batch order.
    scores = probes.continuation_scores(model, config.max_position_embeddings, tokenizer,
                                        [(p.prompt, t) for p in PAIRS for t in (p.chosen, p.rejected)], batch_size=8)
    for i, (ids, n_context) in enumerate(seqs):
        ref = _torch_token_logprobs(smollm2_dir, ids)[n_context - 1:].mean()
        assert abs(scores[i] - ref) < 1e-4


def test_rows_pack_groups_within_their_widths():
    """plan_rows: every group in exactly one row, each row's prompts and k-th continuations within the widths, and
    rows filled (first fit): 12 groups of 8 prompt + 40/30 continuation tokens fill 3 rows of 128 slots."""
    groups = [([1] * 8, [[2] * 40, [3] * 30]) for _ in range(12)] + [([1] * 20, [[2] * 100])]
    prompt_width, continuation_width = scoring.row_widths(groups)
    assert continuation_width == scoring.ROW_WIDTH and prompt_width >= 20
    rows = scoring.plan_rows(groups, prompt_width, continuation_width)
    assert sorted(g for row in rows for g in row) == list(range(len(groups)))
    for row in rows:
        assert sum(len(groups[g][0]) for g in row) <= prompt_width
        for k in range(2):
            assert sum(len(groups[g][1][k]) for g in row if k < len(groups[g][1])) <= continuation_width
    assert len(rows) == 1 + 12 // 3  # the long one alone, three 40-token continuations per row
    batch = scoring.pack_rows(groups, rows, len(rows), prompt_width, continuation_width, passes=2)
    # The first continuation token is predicted by its prompt's last slot, the others by the previous slot.
    first = groups[rows[1][1]]
    assert batch["sources"][0, 1, 40] == len(first[0]) * 2 - 1 and batch["sources"][0, 1, 41] == prompt_width + 40
    assert list(batch["continuation_positions"][1, 1, 30:33]) == [8, 9, 10]
    with pytest.raises(ValueError, match="sliding window of 64"):
        scoring.row_widths(groups, window=64)
    assert sum(scoring.row_widths(groups, window=160)) <= 160


def _tiny_hf_model(out: pathlib.Path, tokenizer_src: pathlib.Path, seed: int) -> pathlib.Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_src / name, out / name)
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("tiny")
    return [_tiny_hf_model(root / f"m{s}", smollm2_dir, s) for s in range(3)]


def _write_pairs(path: pathlib.Path, pairs) -> pathlib.Path:
    path.write_text("".join(json.dumps(vars(p)) + "\n" for p in pairs))
    return path


def test_cli_single_model_writes_result_beside_checkpoint(tiny_models, tmp_path, capsys):
    pairs_file = _write_pairs(tmp_path / "set.jsonl", PAIRS)
    result = probes.main(["--model", str(tiny_models[0]), "--pairs", str(pairs_file), "--json", "--batch_size", "4"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tiny_models[0] / "probes-set.json").read_text())
    assert set(printed["overall"]) == {"accuracy", "margin", "ci95", "n", "runs"}
    assert set(printed["categories"]) == {"a", "b"}
    assert printed["overall"]["n"] == 3 and printed["categories"]["b"]["n"] == 2
    # Category numbers are the overall margins restricted to that category.
    margins = probes.score_model(tiny_models[0], [PAIRS], batch_size=2)[0]
    assert abs(result["overall"]["margin"] - margins.mean()) < 1e-6
    assert abs(result["categories"]["b"]["margin"] - margins[1:].mean()) < 1e-6
    assert result["overall"]["accuracy"] == pytest.approx((margins > 0).mean())


def test_cli_baseline_and_control_with_seeds(tiny_models, tmp_path, capsys):
    pairs_file = _write_pairs(tmp_path / "set.jsonl", PAIRS)
    control_file = _write_pairs(tmp_path / "ctl.jsonl", PAIRS[::-1])
    a, b = tiny_models[:2], tiny_models[2:]
    probes.main(["--model", str(a[0]), "--model", str(a[1]), "--baseline", str(b[0]), "--pairs", str(pairs_file),
                 "--control_pairs", str(control_file), "--json", "--bootstrap", "500"])
    result = json.loads(capsys.readouterr().out)
    ma = np.stack([probes.score_model(m, [PAIRS])[0] for m in a])
    mb = probes.score_model(b[0], [PAIRS])[0][None]
    # Every arm's own result on both sets is saved beside it (what eval.report reads); the comparison beside a[0].
    for model, margins in [(a[0], ma[0]), (a[1], ma[1]), (b[0], mb[0])]:
        own = json.loads((model / "probes-set.json").read_text())
        assert own["overall"]["margin"] == pytest.approx(margins.mean(), abs=1e-6)
        assert own["config"]["models"] == [str(model)] and (model / "probes-ctl.json").is_file()
    assert json.loads((a[0] / "comparison-set.json").read_text()) == result
    vs = result["vs_baseline"]
    assert result["overall"]["runs"] == 2 and vs["runs"] == [2, 1]
    assert vs["margin_diff"] == pytest.approx(ma.mean() - mb.mean(), abs=1e-6)
    assert vs["frac_toward_chosen"] == pytest.approx(((ma.mean(0) - mb.mean(0)) > 0).mean())
    ctl = vs["control"]
    # The control set holds the same pairs reversed, so its shift equals the set's shift and the difference is 0.
    assert ctl["control_shift"] == pytest.approx(ctl["set_shift"], abs=1e-6)
    assert ctl["difference"] == pytest.approx(0, abs=1e-6)
    assert ctl["difference_ci95"][0] <= 0 <= ctl["difference_ci95"][1]


def test_read_pairs_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(vars(PAIRS[0])) + "\n" + json.dumps({"prompt": "x", "chosen": "y", "rejected": "z"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: record lacks \['category'\]"):
        probe_pairs.read_pairs(bad)
    bad.write_text('{"prompt": "x", "chosen": "", "rejected": "z", "category": "c"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: record 1: \['chosen'\] must be non-empty"):
        probe_pairs.read_pairs(bad)


def test_control_needs_baseline(tiny_models, tmp_path):
    pairs_file = _write_pairs(tmp_path / "set.jsonl", PAIRS)
    with pytest.raises(SystemExit):
        probes.main(["--model", str(tiny_models[0]), "--pairs", str(pairs_file), "--control_pairs", str(pairs_file)])


def test_run_directory_scores_like_its_hf_folder_and_saves_under_eval(tiny_models, tmp_path, capsys):
    """A docmix Orbax run directory (latest checkpoint via trainer.checkpoint.restore_model) gives the HF folder's
    margins, and its results land in MODEL_DIR/eval/<step>/."""
    from trainer import convert

    pairs_file = _write_pairs(tmp_path / "set.jsonl", PAIRS)
    convert.hf_to_orbax(tiny_models[1], tmp_path / "run")
    from_run = probes.main(["--model", str(tmp_path / "run"), "--pairs", str(pairs_file), "--json"])
    capsys.readouterr()
    saved = list((tmp_path / "run" / "eval").glob("*/probes-set.json"))
    assert len(saved) == 1 and saved[0].parent.name.isdigit()
    from_hf = probes.score_model(tiny_models[1], [PAIRS])[0]
    assert from_run["overall"]["margin"] == pytest.approx(from_hf.mean(), abs=1e-5)

    # The run's HF export keeps its results in MODEL_DIR/eval/hf/, so the next export may replace the folder
    # (check_target refuses a folder holding files the export did not write).
    from trainer import export

    convert.orbax_to_hf(tmp_path / "run", tmp_path / "run" / "hf")
    probes.main(["--model", str(tmp_path / "run" / "hf"), "--pairs", str(pairs_file)])
    assert (tmp_path / "run" / "eval" / "hf" / "probes-set.json").is_file()
    assert not list((tmp_path / "run" / "hf").glob("probes-*"))
    export.check_target(tmp_path / "run" / "hf", overwrite=True)
    # A periodic export MODEL_DIR/exports/<step> likewise keeps them in MODEL_DIR/eval/exports/<step>/.
    convert.orbax_to_hf(tmp_path / "run", tmp_path / "run" / "exports" / "7")
    probes.main(["--model", str(tmp_path / "run" / "exports" / "7"), "--pairs", str(pairs_file)])
    assert (tmp_path / "run" / "eval" / "exports" / "7" / "probes-set.json").is_file()
    export.check_target(tmp_path / "run" / "exports" / "7", overwrite=True)


@pytest.mark.slow  # ~20 s on an idle 2-core machine: one 135M model in JAX and in torch
def test_chat_mode_scores_the_assistant_turn_like_transformers(smollm2_dir):
    """--chat: the context is transformers' apply_chat_template(user turn, add_generation_prompt=True) and the scored
    tokens are the assistant content's; the mean log-prob matches a transformers computation."""
    import transformers

    from eval import loading

    model, config, tok_dir = loading.load_model(smollm2_dir)
    tokenizer = chat.load(tok_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    chat_set = probe_pairs.chat_pairs(PAIRS)
    assert [p.category for p in chat_set] == ["a", "b"]  # the memo-style pair has no chat form
    items = [(p.prompt, t) for p in chat_set for t in (p.chosen, p.rejected)]
    scores = probes.continuation_scores(model, config.max_position_embeddings, tokenizer, items, batch_size=4,
                                        chat_mode=True)
    for (prompt, text), score in zip(items, scores):
        user = prompt[len("User: "):-len("\nAssistant:")]
        context = list(hf_tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
        target = hf_tok(text.strip(), add_special_tokens=False)["input_ids"]
        ids, n_context = probe_pairs.encode_chat_texts(tokenizer, prompt, text)
        assert ids == context + target and n_context == len(context)
        assert "<|im_start|>assistant\n" in hf_tok.decode(context)
        ref = _torch_token_logprobs(smollm2_dir, ids)[n_context - 1:].mean()
        assert abs(score - ref) < 1e-4
    # Chat and plain scoring differ: the template changes the context.
    plain = probes.continuation_scores(model, config.max_position_embeddings, tokenizer, items, batch_size=4)
    assert np.abs(plain - scores).max() > 1e-3
    with pytest.raises(ValueError, match="chat-style prompt"):
        probe_pairs.encode_chat_texts(tokenizer, PAIRS[1].prompt, PAIRS[1].chosen)


def test_cli_chat_mode_reports_what_it_left_out(tiny_models, tmp_path, capsys):
    pairs_file = _write_pairs(tmp_path / "set.jsonl", PAIRS)
    result = probes.main(["--model", str(tiny_models[0]), "--pairs", str(pairs_file), "--chat", "--json"])
    capsys.readouterr()
    assert result["overall"]["n"] == 2 and result["config"]["chat"] == {"scored": [2], "left_out_document_style": [1]}
    assert (tiny_models[0] / "probes-set-chat.json").is_file()
    margins = probes.score_model(tiny_models[0], [probe_pairs.chat_pairs(PAIRS)], chat_mode=True)[0]
    assert result["overall"]["margin"] == pytest.approx(margins.mean(), abs=1e-6)


def test_identical_models_are_named_as_such(tiny_models, tmp_path, capsys):
    """A model compared with a copy of itself (what a mixture share that got no synthetic row produced) is named as
    identical, by a digest of its parameters, instead of reported as a difference of 0.0 [0, 0]; a model that
    differs is compared as usual."""
    pairs_file = _write_pairs(tmp_path / "set.jsonl", PAIRS)
    copy = shutil.copytree(tiny_models[0], tmp_path / "copy")
    result = probes.main(["--model", str(tiny_models[0]), "--baseline", str(copy), "--pairs", str(pairs_file),
                          "--bootstrap", "200"])
    out = capsys.readouterr().out
    assert result["vs_baseline"]["identical_models"] == [[str(tiny_models[0]), str(copy)]]
    assert result["vs_baseline"]["margin_diff"] == 0.0  # not a measurement: the two are the same parameters
    assert f"identical models: {tiny_models[0]} and {copy} have the same parameters" in out
    assert "every model is identical to a baseline; there is no difference to measure" in out
    assert "margin diff" not in out
    digests = result["config"]["parameters_sha256"]
    assert digests[str(copy)] == digests[str(tiny_models[0])] != probes.param_digest(
        probes.loading.load_model(tiny_models[1])[0])
    result = probes.main(["--model", str(tiny_models[1]), "--baseline", str(copy), "--pairs", str(pairs_file),
                          "--bootstrap", "200"])
    out = capsys.readouterr().out
    assert result["vs_baseline"]["identical_models"] == [] and "identical" not in out and "margin diff" in out


def test_scoring_shows_a_bar_on_a_terminal_only(tiny_models, tmp_path, capsys, monkeypatch):
    import progress

    pairs_file = _write_pairs(tmp_path / "set.jsonl", PAIRS)
    args = ["--model", str(tiny_models[0]), "--baseline", str(tiny_models[1]), "--pairs", str(pairs_file),
            "--bootstrap", "100"]
    probes.main(args)
    assert "scoring" not in capsys.readouterr().err  # a pipe (CI, logs): no bar
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    probes.main(args)
    err = capsys.readouterr().err
    assert "scoring: 100%" in err and "6/6" in err  # 3 pairs of each of the 2 models
