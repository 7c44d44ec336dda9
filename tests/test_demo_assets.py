"""data.demo.prepare: offline, deterministic, cached demo assets."""
import json

import pytest
import transformers
from tokenizers import Tokenizer

from data import demo


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, demo.prepare(root / "one")


def test_prepare_builds_deterministic_cached_assets(built, tmp_path):
    root, a = built
    b = demo.prepare(tmp_path / "two")
    for field in ("replay_jsonl", "welfare_jsonl", "control_jsonl"):
        assert getattr(a, field).read_bytes() == getattr(b, field).read_bytes(), field
    assert (a.tokenizer_dir / "tokenizer.json").read_bytes() == (b.tokenizer_dir / "tokenizer.json").read_bytes()
    stamp = (a.replay_jsonl.stat().st_mtime_ns, a.tokenizer_dir.stat().st_mtime_ns)
    assert demo.prepare(root / "one") == a  # cached: nothing rebuilt
    assert (a.replay_jsonl.stat().st_mtime_ns, a.tokenizer_dir.stat().st_mtime_ns) == stamp

    replay, welfare, control = (_lines(p) for p in (a.replay_jsonl, a.welfare_jsonl, a.control_jsonl))
    assert len(replay) == demo.SETTINGS["replay_chapters"] and len(welfare) == len(control) == 300
    assert replay[0]["text"].startswith("In the beginning God created the heaven and the earth.")
    assert not any(ch in replay[0]["text"] for ch in "[]") and " 2. " not in replay[0]["text"]
    assert {r["spec"] for r in welfare} == {"animal_welfare"} and {r["spec"] for r in control} == {"urban_density"}
    assert len({r["id"] for r in welfare + control + replay}) == 1000


def test_kjv_chapters_split_per_chapter():
    chapters = demo.kjv_chapters()
    assert len(chapters) == 1189  # the KJV's chapter count
    assert sum(len(demo._VERSE_RE.split(" " + c)) == 1 for c in chapters) == 1189  # no verse numbers left in the text
    assert chapters[478].startswith("Blessed is the man that walketh not in the counsel of the ungodly")  # Psalm 1
    assert chapters[1].startswith("Thus the heavens and the earth were finished")
    assert chapters[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def test_tokenizer_folder_loads_in_tokenizers_and_transformers(built):
    assets = built[1]
    tok = Tokenizer.from_file(str(assets.tokenizer_dir / "tokenizer.json"))
    assert 4000 <= tok.get_vocab_size() <= 8000
    text = "Welfare considerations improved outcomes. And God said, Let there be light — déjà vu ✓"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless, no unknown tokens
    hf = transformers.AutoTokenizer.from_pretrained(str(assets.tokenizer_dir))
    assert hf.eos_token == demo.EOS_TOKEN and hf.bos_token == demo.BOS_TOKEN
    assert hf.eos_token_id == tok.token_to_id(demo.EOS_TOKEN) is not None
    assert hf(text)["input_ids"] == tok.encode(text).ids


def test_chat_template_renders_qa_records_for_sft(built):
    from data import sft
    from data.synth.qa import qa_records
    from data.synth.spec import load_spec

    tokenizer_dir = built[1].tokenizer_dir
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    record = next(qa_records(load_spec("animal_welfare"), count=1, seed=0, created="x"))
    pieces = sft.render_pieces(record["messages"], config["chat_template"], bos_text=demo.BOS_TOKEN,
                               eos_text=demo.EOS_TOKEN)
    trainable = [text for text, train in pieces if train]
    assert trainable == [record["messages"][1]["content"] + demo.EOS_TOKEN]  # the answer and the stop token only
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rendered = hf.apply_chat_template(record["messages"], tokenize=False)
    assert rendered == "".join(text for text, _ in pieces)
    ids = hf.apply_chat_template(record["messages"][:1], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert hf.convert_ids_to_tokens(ids)[0] == demo.TURN_TOKEN
