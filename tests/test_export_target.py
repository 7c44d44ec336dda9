"""An export replaces only an earlier export (with --overwrite), never a user's folder or a run directory, nor an
earlier export holding anything it did not write (a file, a folder, a symbolic link); a crash while writing leaves the
earlier export complete, and replacing it deletes only the files its marker lists."""
import hashlib
import logging
import os

import pytest
from flax import nnx
from safetensors.numpy import load_file

import storage
from trainer import convert
from models.transformer import Transformer
from tests.test_checkpoint_signals import tree_digest
from tests.test_train_step import TINY
from trainer import checkpoint, export, run_metadata


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A params-only run directory (what hf-to-orbax writes) holding a tiny model."""
    out = tmp_path_factory.mktemp("run")
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    checkpoint.save_params(out, model, run_metadata.for_params_only(TINY, None, source="test"))
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    return out


def orbax_to_hf(run_dir, out, *extra):
    """The command line's exit code (errors are one line on stderr, exit_codes.run)."""
    import exit_codes

    return exit_codes.run(convert.main, "python -m trainer.convert",
                          ["orbax-to-hf", "--ckpt", str(run_dir), "--out", str(out), *extra])


def snapshot(folder) -> dict[str, str]:
    """Every entry under a local folder, links not followed: each file's SHA-256, each folder, each link's target."""
    def what(path, kind):
        if kind == "file":
            return hashlib.sha256(path.read_bytes()).hexdigest()
        return f"link to {os.readlink(path)}" if kind == "link" else kind

    return {name: what(folder / name, kind) for name, kind in storage.list_entries(folder).items()}


def test_foreign_folders_are_refused_before_reading_the_checkpoint(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my thesis")
    missing_ckpt = tmp_path / "no_such_run"    # the target is checked before any checkpoint is read
    assert orbax_to_hf(missing_ckpt, user) == 2
    assert "not a docmix export" in capsys.readouterr().err
    assert (user / "notes.txt").read_text() == "my thesis"
    afile = tmp_path / "file"
    afile.write_text("x")
    assert orbax_to_hf(missing_ckpt, afile) == 2 and afile.read_text() == "x"


def test_the_run_directory_itself_is_refused(run_dir, capsys):
    digest = tree_digest(run_dir)
    assert orbax_to_hf(run_dir, run_dir, "--overwrite") == 2
    assert "checkpoints" in capsys.readouterr().err
    assert tree_digest(run_dir) == digest


def test_earlier_export_needs_overwrite_and_only_holds_its_own_files(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert orbax_to_hf(run_dir, out) == 0
    assert (out / export.EXPORT_MARKER).is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no temporary folder left
    digest = tree_digest(out)
    assert orbax_to_hf(run_dir, out) == 2
    assert "--overwrite" in capsys.readouterr().err and tree_digest(out) == digest
    assert orbax_to_hf(run_dir, out, "--overwrite", "--dtype", "float32") == 0
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype.name == "float32"
    (out / "eval_results.json").write_text("{}")                               # the user added a file
    assert orbax_to_hf(run_dir, out, "--overwrite") == 2
    assert "eval_results.json" in capsys.readouterr().err and (out / "eval_results.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert orbax_to_hf(run_dir, empty) == 0 and (empty / "config.json").is_file()


def test_a_crash_while_writing_leaves_the_earlier_export(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    assert orbax_to_hf(run_dir, out) == 0
    digest = tree_digest(out)

    def crash(model, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(export.hf_io, "save_pretrained", crash)
    assert orbax_to_hf(run_dir, out, "--overwrite") == 130   # exit_codes.INTERRUPTED
    assert tree_digest(out) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("add, named", [
    (lambda out, mine: (out / "mine").symlink_to(mine), "mine (a symbolic link)"),
    (lambda out, mine: (out / "tokenizer.json").unlink() or (out / "tokenizer.json").symlink_to(mine / "thesis.txt"),
     "tokenizer.json (a symbolic link)"),                                  # a link where the export wrote a file
    (lambda out, mine: (out / "empty").mkdir(), "empty/"),
    (lambda out, mine: (out / "notes" / "more").mkdir(parents=True), "notes/"),
], ids=["link-to-a-folder", "link-in-place-of-a-file", "empty-folder", "folders"])
def test_overwrite_refuses_an_earlier_export_holding_a_link_or_a_folder(run_dir, tmp_path, capsys, add, named):
    out, mine = tmp_path / "hf", tmp_path / "mine"
    assert orbax_to_hf(run_dir, out) == 0
    mine.mkdir()
    (mine / "thesis.txt").write_text("my thesis")
    add(out, mine)
    before = snapshot(out)
    capsys.readouterr()
    assert orbax_to_hf(run_dir, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert named in err and "not replacing it" in err and err.count("\n") == 1
    assert snapshot(out) == before and (mine / "thesis.txt").read_text() == "my thesis"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mine"]    # no temporary sibling left


def test_replacing_deletes_only_the_files_the_earlier_export_listed(run_dir, tmp_path, monkeypatch, caplog):
    """A file that appears in the earlier export after the last check (just before it is moved aside) is kept: the
    old export's listed files are deleted, its folder (holding that file) stays, with a warning naming it."""
    out = tmp_path / "hf"
    assert orbax_to_hf(run_dir, out) == 0
    move = storage.move_tree

    def a_file_appears_first(src, dst):
        if src == out:
            (out / "late.txt").write_text("mine")
        move(src, dst)

    monkeypatch.setattr(export.storage, "move_tree", a_file_appears_first)
    assert orbax_to_hf(run_dir, out, "--overwrite") == 0
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.replaced-")]
    assert snapshot(kept) == {"export": "folder", "export/late.txt": hashlib.sha256(b"mine").hexdigest()}
    assert any(str(kept) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
