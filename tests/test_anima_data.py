"""Local ANIMA copies load without dropping questions: tag spellings normalised, empty tags skipped, variables cleaned."""
import json

import pytest

from eval import anima_data
from tests import extras

pytestmark = extras.require("eval")  # Inspect samples and dimensions


def _target(sample):
    return json.loads(sample.target)


def test_local_copy_keeps_every_question(anima_dir):
    data = anima_data.load(anima_dir)
    lines = [json.loads(x) for x in (anima_dir / "questions.jsonl").read_text().splitlines() if x.strip()]
    assert [s.id for s in data.samples] == [row["id"] for row in lines]
    assert {d.name for d in data.dimensions} == set(anima_data.ANIMA_DIMENSIONS)
    assert data.ignored_tags == {}
    by_id = {s.id: s for s in data.samples}
    for row in lines:
        # Every non-empty tag survives, in ANIMA-2.2 spelling.
        expected = [anima_data.canonical_dimension(t) for t in row["tags"] if t.strip()]
        assert _target(by_id[row["id"]])["tags"] == expected
    assert all("Trade-off Transparency" not in _target(s)["tags"] for s in data.samples)
    assert sum("Trade-Off Transparency" in _target(s)["tags"] for s in data.samples) == sum(
        "Trade-off Transparency" in row["tags"] for row in lines)


def test_empty_tag_spaces_in_variables_and_languages(anima_dir):
    lines = {row["id"]: row for row in map(json.loads, (anima_dir / "questions.jsonl").read_text().splitlines())}
    empty_tag_ids = [i for i, row in lines.items() if "" in row["tags"]]
    assert empty_tag_ids, "the local copy is expected to hold a question with an empty tag"
    data = anima_data.load(anima_dir)
    by_id = {s.id: s for s in data.samples}
    for i in empty_tag_ids:
        assert "" not in _target(by_id[i])["tags"] and _target(by_id[i])["tags"]
    spaced = [i for i, row in lines.items() if row["variables"] and ": " in row["variables"]]
    assert spaced
    for i in spaced:
        for name, values in _target(by_id[i])["variables"].items():
            assert name == name.strip() and all(v == v.strip() and v for v in values)
    assert _target(by_id[9])["variables"] == {"animal": ["guinea pig", "naked mole rats"]}
    english = anima_data.load(anima_dir, languages=["English"])
    assert len(english.samples) == sum(1 for row in lines.values() if row["language"] in (None, "English"))
    assert {s.metadata["language"] for s in english.samples} == {"English"}


def _write(tmp_path, questions, dims=None):
    dims = dims or [{"dimension": "Moral Consideration", "guiding_question": "Does it consider {{animal}}s?",
                     "scoring": "1 for correct", "observable_indicators": "x", "default_weighting": 1.0}]
    (tmp_path / "dimensions.jsonl").write_text("\n".join(json.dumps(d) for d in dims) + "\n")
    (tmp_path / "questions.jsonl").write_text("\n".join(q if isinstance(q, str) else json.dumps(q) for q in questions))
    return tmp_path


def _q(i, tags, variables=None):
    return {"id": i, "question": f"Question {i}?", "tags": tags, "variables": variables, "language": None}


def test_unknown_tags_are_reported_not_silently_dropped(tmp_path, caplog):
    root = _write(tmp_path, [_q(0, ["moral  consideration", "Perspective-Taking"]), _q(1, ["Moral Consideration"])])
    data = anima_data.load(root)
    assert [s.id for s in data.samples] == [0, 1]
    assert _target(data.samples[0])["tags"] == ["Moral Consideration"]
    assert data.ignored_tags == {0: ("Perspective-Taking",)}
    assert "Perspective-Taking" in caplog.text


@pytest.mark.parametrize("questions, match", [
    ([_q(0, ["Perspective-Taking"])], r"questions.jsonl:1: question 0 has no tag naming a dimension"),
    ([json.dumps(_q(0, ["Moral Consideration"])), "{not json"], r"questions.jsonl:2: invalid JSON"),
    ([_q(0, ["Moral Consideration"], "animal pig")], r"questions.jsonl:1: malformed variables"),
    ([{"id": 0, "question": "q"}], r"questions.jsonl:1: missing field\(s\) \['tags'\]"),
])
def test_bad_rows_are_clear_errors(tmp_path, questions, match):
    with pytest.raises(ValueError, match=match):
        anima_data.load(_write(tmp_path, questions))


def test_missing_files_and_empty_language_filter(tmp_path):
    with pytest.raises(FileNotFoundError, match="dimensions.jsonl"):
        anima_data.load(tmp_path)
    root = _write(tmp_path, [_q(0, ["Moral Consideration"])])
    with pytest.raises(ValueError, match="no questions left"):
        anima_data.load(root, languages=["Klingon"])


def test_fetch_asks_for_the_revision_inspect_evals_pins():
    """`eval.anima_data fetch` works without Inspect, so it names the dataset itself; it must be the one Inspect uses."""
    from inspect_evals.anima.dataset import DATASET_DEFAULT_REVISION, DATASET_REPO_ID

    assert (anima_data.HUB_REPO, anima_data.HUB_REVISION) == (DATASET_REPO_ID, DATASET_DEFAULT_REVISION)
