"""Gin file lookup must not depend on what folders happen to sit in the working directory."""
import pytest

from trainer import config


def test_runs_output_folder_does_not_break_config_lookup(tmp_path, monkeypatch):
    # The demo writes ./runs/demo; gin's package reader must not take that folder for a (namespace) package.
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "mixtures").mkdir()
    monkeypatch.chdir(tmp_path)
    run = config.load(["runs/demo.gin"], ["TRAIN_STEPS = 7"])
    assert run.train_steps == 7


def test_missing_gin_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError, match="runs/nope.gin"):
        config.load(["runs/nope.gin"], [])
