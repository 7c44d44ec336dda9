"""What docmix writes for the user has the modes the process's umask gives (0644/0755 under umask 022, 0640/0750 under
027), so a serving container or another user reads what the umask lets them read: an export and its replacement
(tempfile's 0700 folder and safetensors' 0600 files were kept), a converted folder (hf-to-orbax) and eval results
(eval.report). A run directory and its export, written by train.py: test_train_resume.py."""
from __future__ import annotations

import json
import os
import pathlib
import stat

import pytest

import exit_codes
from eval import report
from tests.test_convert import hf_to_orbax
from tests.test_export_target import orbax_to_hf, run_dir  # noqa: F401 - run_dir is a fixture


def wrong_modes(root: pathlib.Path, umask: int) -> list[str]:
    """`root` and everything under it whose mode is not what creating it plainly gives under `umask`."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode != want:
            wrong.append(f"{path.relative_to(root)}: {mode:o}, not {want:o}")
    return wrong


@pytest.fixture(params=[0o022, 0o027], ids=lambda mask: f"umask{mask:03o}")
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_exports_conversions_and_reports_follow_the_umask(run_dir, tmp_path, umask):  # noqa: F811
    hf = tmp_path / "hf"
    assert orbax_to_hf(run_dir, hf) == 0
    assert wrong_modes(hf, umask) == []
    assert orbax_to_hf(run_dir, hf, "--overwrite", "--dtype", "float32") == 0  # a replacement
    assert wrong_modes(hf, umask) == []
    converted = tmp_path / "converted"
    assert hf_to_orbax(hf, converted) == 0
    assert wrong_modes(converted, umask) == []
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - s}) + "\n" for s in (1, 2)))
    out = tmp_path / "report"
    assert exit_codes.run(report.main, "python -m eval.report", [str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) and wrong_modes(out, umask) == []
