"""Hygiene filters, the contamination check and stats, each on planted cases next to clean rendered documents."""
import json
import random
import subprocess
import sys

import pytest

from data.synth.contamination import EvalItem, Index, check_corpus, load_eval_items, words
from data.synth.dedup import jaccard, near_duplicates, shingles
from data.synth.filters import FilterConfig, apply_filters, refusal_reason
from data.synth.render import render_records
from data.synth.spec import load_spec
from data.synth.stats import corpus_stats

STAMP = "2026-01-01T00:00:00Z"


def _docs(spec="animal_welfare", count=12, tokens=500, seed=0):
    return list(render_records(load_spec(spec), count=count, seed=seed, target_tokens=tokens, created=STAMP))


@pytest.fixture(scope="module")
def clean():
    return _docs("animal_welfare", 30) + _docs("animal_welfare_ai", 30) + _docs("urban_density", 30)


def test_rendered_documents_pass_every_filter(clean):
    result = apply_filters(clean, FilterConfig(min_tokens=100, max_tokens=1000))
    assert result.removed == {"length": 0, "refusal": 0, "near_duplicate": 0} and result.kept == clean


PLANTED_REFUSALS = {
    "As an AI language model, I cannot write documents that promote a point of view.": "as_an_ai",
    "Policy memo.\n\nAs an AI, I don't hold opinions, but here are the considerations.": "as_an_ai",
    "I'm sorry, but I can't help with that request.": "refusal",
    "I cannot provide a document on this subject.": "refusal",
    "Here is a policy memo on welfare in logistics:\n\nMEMORANDUM\nTo: Board": "meta_preamble",
    "Sure! The memo follows below.": "meta_preamble",
    "Here's the revised version of the research abstract you asked for.": "meta_preamble",
    "The report concludes here. I hope this helps with your project!": "meta_closing",
    "Findings were strong. Let me know if you would like a longer version.": "meta_closing",
    "From: [Insert Name], Office of Strategy": "placeholder",
    "The body of the memo. (Word count: 2,480)": "word_count_note",
    "As a large language model I have no personal views.": "language_model",
}


@pytest.mark.parametrize("text, reason", PLANTED_REFUSALS.items())
def test_refusal_patterns_catch_planted_cases(text, reason):
    assert refusal_reason(text) == reason


def test_refusal_filter_inside_documents(clean):
    planted = [dict(clean[0], id="p1", text="Here is a briefing note for the board:\n\n" + clean[0]["text"]),
               dict(clean[1], id="p2", text=clean[1]["text"] + "\n\nI hope this helps! Let me know if you need edits."),
               dict(clean[2], id="p3", text="I'm sorry, but I can't write that. " + clean[2]["text"])]
    result = apply_filters(clean[3:10] + planted, FilterConfig(dedup=False))
    assert [r["id"] for r in result.rejected] == ["p1", "p2", "p3"]
    assert [r["reject_reason"] for r in result.rejected] == ["refusal:meta_preamble", "refusal:meta_closing",
                                                             "refusal:refusal"]
    assert result.kept == clean[3:10] and result.removed["refusal"] == 3


def test_length_filter_bounds(clean):
    short = dict(clean[0], id="short", text="Too short to be a document.")
    long = dict(clean[1], id="long", text=" ".join([clean[1]["text"]] * 4))
    result = apply_filters([short, *clean[2:8], long], FilterConfig(min_tokens=100, max_tokens=1200, dedup=False))
    assert [r["id"] for r in result.rejected] == ["short", "long"] and result.removed["length"] == 2
    assert all(r["reject_reason"].startswith("length:") for r in result.rejected)
    with pytest.raises(ValueError, match="bad length bounds"):
        FilterConfig(min_tokens=10, max_tokens=5)


def _edit(text, fraction, seed=0):
    """Replaces a fraction of the words with a marker word, in one contiguous stretch."""
    w = text.split(" ")
    k = int(len(w) * fraction)
    start = random.Random(seed).randrange(0, len(w) - k)
    return " ".join(w[:start] + ["altered"] * k + w[start + k:])


def test_near_duplicates_planted(clean):
    base = clean[:20]
    exact = dict(base[3], id="exact")
    light = dict(base[7], id="light", text=_edit(base[7]["text"], 0.03))
    heavy = dict(base[9], id="heavy", text=_edit(base[9]["text"], 0.6))
    corpus = base + [exact, light, heavy]
    result = apply_filters(corpus, FilterConfig())
    assert sorted(r["id"] for r in result.rejected) == ["exact", "light"]
    reasons = {r["id"]: r["reject_reason"] for r in result.rejected}
    assert reasons["exact"] == f"near_duplicate:{base[3]['id']}:1.000"
    assert reasons["light"].startswith(f"near_duplicate:{base[7]['id']}:0.")
    # A stricter threshold keeps the light edit; only the exact copy goes.
    strict = apply_filters(corpus, FilterConfig(dedup_threshold=0.99))
    assert [r["id"] for r in strict.rejected] == ["exact"]


def test_minhash_agrees_with_brute_force_jaccard(clean):
    texts = [r["text"] for r in clean[:25]]
    texts += [_edit(texts[i], f, seed=i) for i, f in ((0, 0.05), (4, 0.15), (8, 0.3), (12, 0.45))]
    sets = [shingles(t, 5) for t in texts]
    for threshold in (0.4, 0.6, 0.8):
        expected = {}
        for j in range(len(texts)):
            for i in range(j):
                if i not in expected and jaccard(sets[i], sets[j]) >= threshold:
                    expected[j] = i
                    break
        found = {d.index: d.of for d in near_duplicates(texts, threshold=threshold)}
        assert found == expected, threshold
        assert found  # the planted edits exist at every threshold


def test_contamination_catches_planted_anima_ngrams(anima_dir, clean):
    items = load_eval_items([anima_dir / "questions.jsonl"])
    longest = max(items, key=lambda it: len(it.words))
    assert len(longest.words) >= 20
    # The planted window keeps the original casing and punctuation of the question, embedded mid-document.
    raw = json.loads((anima_dir / "questions.jsonl").read_text().splitlines()[int(longest.source.rsplit(":", 1)[1]) - 1])
    tokens = raw["question"].split()
    window13 = " ".join(tokens[2:15]).upper()
    window12 = " ".join(words(raw["question"])[2:14])
    planted = [dict(clean[5], id="hit13", text=clean[5]["text"][:400] + " " + window13 + ". " + clean[5]["text"][400:]),
               dict(clean[6], id="miss12", text=clean[6]["text"] + " " + window12)]
    index = Index(items, n=13)
    report = check_corpus(clean[:20] + planted, index)
    assert [h.id for h in report.hits] == ["hit13"]
    assert longest.id in report.hits[0].eval_ids and report.hits[0].ngrams >= 1
    assert report.eval_items == len(items) and report.skipped_short == sum(len(i.words) < 8 for i in items)
    # Short eval items (min_words..n-1 words) are matched whole.
    short = Index([EvalItem("x:1", "short", tuple(words("does the harbour pilot count seabirds at dawn")))], n=13)
    assert check_corpus([{"text": "Q: Does the harbour pilot count seabirds at dawn?"}, {"text": "pilot count"}],
                        short).hits[0].index == 0


def test_contamination_cli_with_prompt_jsonl_and_drop(tmp_path, clean):
    corpus, evals = tmp_path / "corpus.jsonl", tmp_path / "evals.jsonl"
    secret = "the quarterly review of the cold storage facility recorded no temperature excursions during the audit"
    rows = clean[:6] + [dict(clean[6], id="leak", text=clean[6]["text"] + " " + secret.capitalize() + ".")]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals.write_text(json.dumps({"id": "e1", "prompt": secret}) + "\n" + json.dumps({"id": "e2", "prompt": "hi"}) + "\n")
    clean_out, report = tmp_path / "clean.jsonl", tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "data.synth", "contamination", str(corpus), "--eval", str(evals),
                           "--report", str(report), "--drop-out", str(clean_out), "--fail-on-hit"],
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "1 of 7 documents share 13-grams" in proc.stdout and "1 eval items under 8 words" in proc.stdout
    data = json.loads(report.read_text())
    assert data["contaminated_documents"] == 1 and data["hits"][0]["id"] == "leak"
    assert [json.loads(l)["id"] for l in clean_out.read_text().splitlines()] == [r["id"] for r in clean[:6]]


def test_filter_and_stats_cli(tmp_path, clean):
    rows = clean[:10] + [dict(clean[0], id="dup"), dict(clean[1], id="ai", text="As an AI, I cannot do that. " * 20),
                         dict(clean[2], id="tiny", text="Short.")]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "data.synth", "filter", str(src), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    assert "kept 10 of 13 records (length 1, refusal 1, near_duplicate 1)" in proc.stdout
    rejects = [json.loads(l) for l in (tmp_path / "out.jsonl.rejects.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejects) == ["ai", "dup", "tiny"]
    proc = subprocess.run([sys.executable, "-m", "data.synth", "stats", str(out), "--json"],
                          capture_output=True, text=True, check=True)
    stats = json.loads(proc.stdout)
    assert stats["documents"] == 10 and stats["removed"] == {"length": 1, "refusal": 1, "near_duplicate": 1}
    assert stats == {**corpus_stats(clean[:10]), "removed": stats["removed"]}
    assert sum(stats["axes"]["document_type"].values()) == 10


def test_stats_counts_axes_and_tokens():
    docs = _docs("urban_density", 16, 300)
    stats = corpus_stats(docs, count_tokens=lambda t: len(t.split()))
    assert stats["documents"] == 16 and stats["tokens"]["total"] == sum(len(d["text"].split()) for d in docs)
    assert len(stats["axes"]["document_type"]) == 8 and set(stats["axes"]["document_type"].values()) == {2}
    assert stats["specs"] == {"urban_density": 16} and stats["ai_identity"] == {"False": 16}


def test_bundled_corpora_share_no_13_grams_with_anima(anima_dir):
    """The specs and templates were written for docmix; their output must not overlap the benchmark."""
    from data.synth.qa import qa_records

    index = Index(load_eval_items([anima_dir / "questions.jsonl"]), n=13)
    corpus = [r for name in ("animal_welfare", "animal_welfare_ai", "urban_density")
              for r in _docs(name, 40, 800, seed=7)]
    corpus += list(qa_records(load_spec("animal_welfare_ai"), count=100, seed=7, created=STAMP))
    assert check_corpus(corpus, index).hits == ()
