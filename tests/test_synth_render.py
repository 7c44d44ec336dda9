"""Specs, axis assignment and the offline template renderer of data.synth."""
import collections
import json
import re
import subprocess
import sys

import pytest

from data.synth import templates as T
from data.synth.assign import assign
from data.synth.records import approx_tokens
from data.synth.render import render_document, render_records
from data.synth.spec import AXES, SpecError, load_spec

STAMP = "2026-01-01T00:00:00Z"


def _template_regex(template: str) -> re.Pattern:
    """A regex matching any rendering of a template (slots -> .*?, [a|b] -> (a|b)); first letter case-insensitive."""
    out, i = "", 0
    for m in re.finditer(r"\{[a-z_]+2?\}|\[([^\[\]]*\|[^\[\]]*)\]", template):
        out += re.escape(template[i:m.start()])
        out += f"(?:{'|'.join(map(re.escape, m.group(1).split('|')))})" if m.group(1) else ".*?"
        i = m.end()
    out += re.escape(template[i:])
    return re.compile(f"(?i:{out[:1]}){out[1:]}" if out[:1].isalpha() else out)


def test_bundled_specs_are_matched_on_axes_and_lengths():
    welfare, ai, control = (load_spec(n) for n in ("animal_welfare", "animal_welfare_ai", "urban_density"))
    for other in (ai, control):
        assert other.axes == welfare.axes
        assert (other.target_tokens, other.count, other.seed) == (welfare.target_tokens, welfare.count, welfare.seed)
    assert [len(welfare.axes[a]) for a in AXES] == [50, 40, 8, 7]
    assert (welfare.ai_identity, ai.ai_identity, control.ai_identity) == (False, True, False)
    assert ai.pools == welfare.pools and control.pools != welfare.pools
    assert len({welfare.hash, ai.hash, control.hash}) == 3
    assert load_spec(welfare.source).hash == welfare.hash  # by path == by name


@pytest.mark.parametrize("body, message", [
    ("name: x\nbogus: 1\n", "unknown keys ['bogus']"),
    ("extends: animal_welfare\nname: x\npools: {claims: []}\n", "pools.claims"),
    ("extends: urban_density\nname: x\nframing: {ai_identity: true, ai_framing: null}\n", "ai_framing"),
    ("extends: animal_welfare\nname: x\ncount: 0\n", "`count` must be a positive integer"),
    ("extends: nope_not_here\nname: x\n", "unknown spec 'nope_not_here'"),
    ("extends: animal_welfare\nname: x\naxes: {domains: [a, a]}\n", "duplicate entries ['a']"),
])
def test_bad_specs_name_file_and_key(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(SpecError, match=re.escape(message)):
        load_spec(path)


def test_assignment_covers_every_axis_and_is_prefix_stable():
    spec = load_spec("animal_welfare")
    first = [assign(spec, 3, i) for i in range(50)]
    for axis in AXES:
        assert set(a[axis] for a in first[: len(spec.axes[axis])]) == set(spec.axes[axis]), axis
    assert [assign(spec, 3, i) for i in range(10)] == first[:10]
    assert first != [assign(spec, 4, i) for i in range(50)]
    # Axes vary independently: many distinct (domain, document_type) pairs, not a fixed cycle.
    assert len({(a["domain"], a["document_type"]) for a in first}) > 40


def test_render_is_deterministic_and_seed_dependent():
    spec = load_spec("animal_welfare")
    a = list(render_records(spec, count=6, seed=1, target_tokens=300, created=STAMP))
    b = list(render_records(spec, count=6, seed=1, target_tokens=300, created=STAMP))
    c = list(render_records(spec, count=6, seed=2, target_tokens=300, created=STAMP))
    assert a == b
    assert all(x["text"] != y["text"] for x, y in zip(a, c))
    assert len({r["id"] for r in a}) == 6 and len({r["text"] for r in a}) == 6
    assert a[0]["spec_hash"] == spec.hash and a[0]["generator"].startswith("docmix-template-renderer")
    assert set(a[0]["axes"]) == set(AXES) and a[0]["created"] == STAMP


def test_documents_express_their_axes():
    spec = load_spec("animal_welfare")
    approach_res = {k: [_template_regex(t) for t in v] for k, v in T.APPROACHES.items()}
    seen = collections.defaultdict(set)
    for record in render_records(spec, count=56, seed=0, target_tokens=500, created=STAMP):
        text, axes = record["text"], record["axes"]
        for axis in AXES:
            seen[axis].add(axes[axis])
        assert axes["institution"] in text and axes["domain"] in text
        for approach, regexes in approach_res.items():
            hit = any(r.search(text) for r in regexes)
            assert hit == (approach == axes["reasoning_approach"]), (approach, axes)
        assert "{" not in text and "}" not in text and "[" not in text.replace("## ", "")
    assert {axis: len(v) for axis, v in seen.items()} == {"institution": 50, "domain": 40, "document_type": 8,
                                                          "reasoning_approach": 7}


def test_document_type_headers():
    spec = load_spec("urban_density")
    markers = {"policy memo": "MEMORANDUM\nTo: ", "white paper": "WHITE PAPER\n", "case study": "Case Study: ",
               "briefing note": "BRIEFING NOTE — ", "conference summary": "Conference Summary\n",
               "research abstract": "\n\nAbstract\n", "best-practice guide": "A best-practice guide from ",
               "institutional report": " Report "}
    for i in range(16):
        text, axes = render_document(spec, 0, i, 300)
        assert markers[axes["document_type"]] in text


def test_themes_and_ai_framing_stay_apart():
    def strip_axes(r):  # the shared axes (e.g. "Thornbury Veterinary School") are matched on purpose
        return r["text"].replace(r["axes"]["institution"], "").replace(r["axes"]["domain"], "")

    docs = {name: [strip_axes(r) for r in render_records(load_spec(name), count=20, seed=0, target_tokens=600,
                                                         created=STAMP)]
            for name in ("animal_welfare", "animal_welfare_ai", "urban_density")}
    framing = [_template_regex(t) for t in load_spec("animal_welfare_ai").ai_framing]
    assert all(sum(bool(r.search(t)) for r in framing) >= 2 for t in docs["animal_welfare_ai"])
    assert sum("harmless" in t for t in docs["animal_welfare_ai"]) >= 15
    assert not any(re.search(r"\bAI\b|harmless", t) for t in docs["animal_welfare"] + docs["urban_density"])
    assert not any(re.search(r"animal|welfare|sentient|humane|veterinar", t, re.I) for t in docs["urban_density"])
    assert all(re.search(r"welfare|sentient|humane|animal", t, re.I) for t in docs["animal_welfare"])
    # No lecturing: no imperative "you should" style sentences.
    assert not any(re.search(r"\byou (should|must|ought)\b", t, re.I) for ts in docs.values() for t in ts)


@pytest.mark.parametrize("target", [400, 2500])
def test_target_length(target):
    spec = load_spec("animal_welfare_ai")
    lengths = [approx_tokens(render_document(spec, 0, i, target)[0]) for i in range(24)]
    mean = sum(lengths) / len(lengths)
    assert 0.9 * target <= mean <= 1.2 * target, (mean, min(lengths), max(lengths))
    assert min(lengths) >= 0.7 * target


def test_cli_render_is_byte_identical(tmp_path):
    outs = []
    for name, spec in (("a", "animal_welfare"), ("b", load_spec("animal_welfare").source)):
        out = tmp_path / f"{name}.jsonl"
        proc = subprocess.run([sys.executable, "-m", "data.synth", "render", "--spec", spec, "--count", "7",
                               "--seed", "5", "--target-tokens", "300", "--timestamp", STAMP, "--out", str(out)],
                              capture_output=True, text=True, check=True)
        assert "rendered 7 documents" in proc.stdout
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    records = [json.loads(line) for line in outs[0].decode().splitlines()]
    assert [r["index"] for r in records] == list(range(7)) and all(r["seed"] == 5 for r in records)


def test_cli_rejects_unknown_spec(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data.synth", "render", "--spec", "nope", "--count", "1",
                           "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown spec 'nope'" in proc.stderr
