"""The shipped probe sets: schema, sizes, theme coverage, no duplicates, matched lengths, no overlap with ANIMA."""
import json
import pathlib
import re

import pytest

SETS_DIR = pathlib.Path(__file__).resolve().parents[1] / "eval" / "probe_sets"
MIN_PAIRS = {"animal_welfare": 150, "human_compassion": 60, "neutral_control": 100, "animal_welfare_lexical": 52}
# One theme per ANIMA dimension (the 13 of eval/anima_data.py), written as our own category names.
WELFARE_THEMES = {
    "moral_consideration", "harm_minimization", "sentience_acknowledgement", "prejudice_avoidance", "scope_sensitivity",
    "evidence_based_capacity", "cautious_impact", "actionability", "contextual_welfare_salience", "epistemic_humility",
    "tradeoff_transparency", "novel_entity_precaution", "control_questions",
}
NGRAM = 13


def _read(name: str) -> list[dict]:
    rows = []
    with open(SETS_DIR / f"{name}.jsonl", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            rows.append((lineno, json.loads(line)))
    return rows


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


@pytest.mark.parametrize("name", sorted(MIN_PAIRS))
def test_schema_size_and_balance(name):
    rows = _read(name)
    assert len(rows) >= MIN_PAIRS[name]
    seen_prompts, seen_texts = set(), set()
    for lineno, row in rows:
        where = f"{name}.jsonl:{lineno}"
        assert set(row) == {"prompt", "chosen", "rejected", "category"}, where
        assert all(isinstance(v, str) and v.strip() for v in row.values()), where
        assert row["chosen"] != row["rejected"], where
        assert row["prompt"] not in seen_prompts, f"duplicate prompt at {where}"
        seen_prompts.add(row["prompt"])
        for text in (row["chosen"], row["rejected"]):
            assert text not in seen_texts, f"duplicate continuation at {where}"
            seen_texts.add(text)
        # Matched lengths, so the length-normalized margin measures the content, not verbosity.
        ratio = len(row["chosen"].split()) / len(row["rejected"].split())
        assert 0.75 <= ratio <= 1.34, f"{where}: chosen/rejected word ratio {ratio:.2f}"
        # Both document openings (memo/report) and chat questions; a chat prompt ends at the assistant turn.
        if row["prompt"].startswith("User:"):
            assert row["prompt"].endswith("\nAssistant:") and row["chosen"].startswith(" "), where
    chat = sum(r["prompt"].startswith("User:") for _, r in rows)
    assert 0.3 <= chat / len(rows) <= 0.7, f"{name}: {chat}/{len(rows)} chat prompts; want both styles"


def test_welfare_covers_every_anima_theme_evenly():
    counts: dict[str, int] = {}
    for _, row in _read("animal_welfare"):
        counts[row["category"]] = counts.get(row["category"], 0) + 1
    assert set(counts) == WELFARE_THEMES
    assert min(counts.values()) >= 10


# Words a lexically matched pair may use on one side only: they carry the stance (negation, comparison, order)
# without bringing topic vocabulary.
STANCE_WORDS = {
    "not", "no", "nothing", "never", "none", "more", "less", "only", "just", "but", "and", "so", "than", "rather",
    "instead", "yes", "both", "all", "since", "from", "there", "even", "a", "an", "the", "of", "to", "is", "it", "its",
    "are", "be", "do", "does", "did", "can", "cannot", "could", "should", "may", "might", "will", "would", "need",
    "needed", "needs", "that", "this", "these", "as", "for", "with", "at", "in", "on", "by", "or", "if", "any",
    "every", "some", "first", "second", "then", "what", "which", "we", "they", "them", "their", "our", "you", "your",
    "he", "his"}


def _content_words(text: str) -> list[str]:
    """Content words with a plural/third-person -s stripped (matters ~ matter), sorted."""
    words = [w for w in re.findall(r"[a-z0-9'\-]+", text.lower()) if w not in STANCE_WORDS]
    return sorted(w[:-1] if w.endswith("s") and len(w) > 3 and not w.endswith("ss") else w for w in words)


def test_lexical_set_matches_content_words_and_covers_every_theme():
    """chosen and rejected use the same content words (they differ in stance: order, negation, comparison), so a
    shift on this set cannot come from the documents' vocabulary alone."""
    counts: dict[str, int] = {}
    for lineno, row in _read("animal_welfare_lexical"):
        assert _content_words(row["chosen"]) == _content_words(row["rejected"]), f"animal_welfare_lexical.jsonl:{lineno}"
        counts[row["category"]] = counts.get(row["category"], 0) + 1
    assert set(counts) == WELFARE_THEMES and min(counts.values()) >= 4
    # The check is not vacuous: an ordinary welfare pair differs in content words.
    _, first = _read("animal_welfare")[0]
    assert _content_words(first["chosen"]) != _content_words(first["rejected"])


def test_no_13gram_overlap_with_anima(anima_dir):
    anima = set()
    with open(anima_dir / "questions.jsonl", encoding="utf-8") as f:
        for line in f:
            anima |= _ngrams(json.loads(line)["question"])
    assert len(anima) > 100  # the check is only meaningful if the questions were read
    for name in MIN_PAIRS:
        for lineno, row in _read(name):
            for field in ("prompt", "chosen", "rejected"):
                shared = _ngrams(row[field]) & anima
                assert not shared, f"{name}.jsonl:{lineno} {field} shares a 13-gram with ANIMA: {' '.join(next(iter(shared)))}"
