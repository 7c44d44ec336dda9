"""data.fingerprint: what a change of the corpora looks like to a resume (files added, removed, resized, changed,
reordered; a moved corpus is the same data), the stated guarantee on large files (both ends hashed, the middle not),
and the same fingerprint read from a bucket (GCS emulator) as from the local files."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from data import fingerprint
from data.config import Component, MixtureConfig
from tests.test_data_util import word_tokenizer, words_doc, write_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]


def _mixture(tok: pathlib.Path, replay: tuple[str, ...], synth: str, synth_weight: float = 0.5) -> MixtureConfig:
    return MixtureConfig(components=(Component("replay", paths=replay), Component("synthetic", paths=(synth,))),
                         weights={"replay": 1 - synth_weight, "synthetic": synth_weight}, tokenizer=str(tok))


def _corpus(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True)
    for i in range(3):
        write_jsonl(folder / f"part-{i}.jsonl", [words_doc(20, 10 * i + j) for j in range(4)])
    write_jsonl(folder / "synth.jsonl", [words_doc(30, 100 + j) for j in range(5)])
    return folder


def test_changes_name_each_file_added_removed_resized_or_changed(tmp_path):
    tok = word_tokenizer(tmp_path / "tok")
    data = _corpus(tmp_path / "data")
    mixture = _mixture(tok, (str(data / "part-*.jsonl"),), str(data / "synth.jsonl"))
    before = fingerprint.fingerprint(mixture)
    assert [f["path"] for f in before["replay"]["files"]] == [str(data / f"part-{i}.jsonl") for i in range(3)]
    assert fingerprint.changes(before, fingerprint.fingerprint(mixture)) == []

    (data / "part-1.jsonl").write_text((data / "part-1.jsonl").read_text() + json.dumps(words_doc(5, 7)) + "\n")
    text = (data / "synth.jsonl").read_text()
    (data / "synth.jsonl").write_text(text.replace("w700", "w701", 1))  # same size, other bytes
    (data / "part-2.jsonl").unlink()
    write_jsonl(data / "part-3.jsonl", [words_doc(20, 99)])
    after = fingerprint.fingerprint(mixture)
    assert fingerprint.changes(before, after) == [
        f"component 'replay': {data}/part-2.jsonl removed, {data}/part-3.jsonl added, {data}/part-1.jsonl resized "
        f"({before['replay']['files'][1]['size']} -> {(data / 'part-1.jsonl').stat().st_size} bytes)",
        f"component 'synthetic': {data}/synth.jsonl content changed"]
    # Reordered files read the documents in another order; a component only one side has is the mixture's business.
    reordered = {**after, "replay": {**after["replay"], "files": after["replay"]["files"][::-1]}}
    assert fingerprint.changes(after, reordered) == ["component 'replay': the order of its files changed"]
    assert fingerprint.changes({"replay": after["replay"]}, after) == []
    # An inactive component (weight 0) is never read, so it is not fingerprinted.
    assert set(fingerprint.fingerprint(_mixture(tok, (str(data / "part-*.jsonl"),), "absent.jsonl", 0.0))) == \
        {"replay"}


def test_a_moved_corpus_is_the_same_data_and_datasets_are_named(tmp_path):
    tok = word_tokenizer(tmp_path / "tok")
    here, there = _corpus(tmp_path / "here"), _corpus(tmp_path / "elsewhere" / "copy")
    fp_here = fingerprint.fingerprint(_mixture(tok, (str(here / "part-*.jsonl"),), str(here / "synth.jsonl")))
    fp_there = fingerprint.fingerprint(_mixture(tok, (str(there / "part-*.jsonl"),), str(there / "synth.jsonl")))
    assert fp_here != fp_there and fingerprint.changes(fp_here, fp_there) == []
    write_jsonl(there / "part-0.jsonl", [words_doc(20, 55)])
    moved = fingerprint.fingerprint(_mixture(tok, (str(there / "part-*.jsonl"),), str(there / "synth.jsonl")))
    assert fingerprint.changes(fp_here, moved)[0].startswith("component 'replay': part-0.jsonl resized")
    tfds = {"kind": "tfds", "dataset": "lm1b/1.1.0", "split": "train", "data_dir": None}
    assert fingerprint.changes({"replay": tfds}, {"replay": {**tfds, "split": "test"}}) == [
        "component 'replay': tfds lm1b/1.1.0[train] -> tfds lm1b/1.1.0[test]"]


def test_large_files_are_read_at_both_ends_only(tmp_path, monkeypatch):
    """The stated guarantee, on a file of 4 x EDGE bytes: a change in its first or last EDGE bytes is found, a
    same-size change in between is not (only 2 x EDGE bytes of it are read)."""
    monkeypatch.setattr(fingerprint, "EDGE", 64)
    path = tmp_path / "big.jsonl"
    text = "".join(json.dumps({"text": f"line {i:03d}"}) + "\n" for i in range(16))
    assert len(text) > 4 * 64
    path.write_text(text)
    component = Component("c", paths=(str(path),))
    base = fingerprint._file(fingerprint._files(component)[0])
    assert base[0] == len(text)
    for at, found in ((0, True), (len(text) // 2, False), (len(text) - 3, True)):
        path.write_text(text[:at] + ("X" if text[at] != "X" else "Y") + text[at + 1:])
        assert (fingerprint._file(fingerprint._files(component)[0]) != base) is found, at


@pytest.mark.gcs  # skipped without the GCS extra (tests/conftest.py)
def test_a_corpus_in_a_bucket_has_the_fingerprint_of_its_local_copy(tmp_path):
    """Read through storage (gcsfs) from the GCS emulator, in a process of its own (gcsfs reads its settings at
    import): the same sizes and hashes as the local files, named relative to their folder."""
    tok = word_tokenizer(tmp_path / "tok")
    data = _corpus(tmp_path / "data")
    local = fingerprint.fingerprint(_mixture(tok, (str(data / "part-*.jsonl"),), str(data / "synth.jsonl")))
    script = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from tests import gcs_emulator
with gcs_emulator.emulator():
    import storage
    from data import fingerprint
    from tests.test_data_fingerprint import _mixture
    for name in ("part-0.jsonl", "part-1.jsonl", "part-2.jsonl", "synth.jsonl"):
        storage.copy_file({str(data)!r} + "/" + name, "gs://bucket/corpus/" + name)
    mixture = _mixture({str(tok)!r}, ("gs://bucket/corpus/part-*.jsonl",), "gs://bucket/corpus/synth.jsonl")
    print(json.dumps(fingerprint.fingerprint(mixture)))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [f["path"] for f in remote["replay"]["files"]] == [f"gs://bucket/corpus/part-{i}.jsonl" for i in range(3)]
    assert [(f["size"], f["sha256"]) for c in ("replay", "synthetic") for f in remote[c]["files"]] == \
        [(f["size"], f["sha256"]) for c in ("replay", "synthetic") for f in local[c]["files"]]
    assert fingerprint.changes(local, remote) == []
