"""metrics.jsonl after a kill while records were appended: a torn last record (the last line, without its newline) is
dropped with one warning naming the file, by every reader (metrics_file.read, eval.report, the experiments' step-time
estimate) and by the rewrite at resume, after which appends are whole lines again; any other malformed line is an
error naming the file and line. gs:// (a torn record in metrics.jsonl or a part): test_gcs_run_disk.py; a real
train.py run killed while it writes a record: test_train_resume.py."""
from __future__ import annotations

import json
import logging

import pytest

import exit_codes
from eval import report
from experiments import estimate
from trainer import metrics_file


def records(steps) -> list[dict]:
    return [{"step": s, "loss": 2.5 - s / 8, "step_time_s": 0.5 + s} for s in steps]


def lines(steps) -> str:
    return "".join(json.dumps(r) + "\n" for r in records(steps))


def torn(step: int) -> str:
    """The first half of a record's line: what a kill in the middle of its write leaves."""
    line = json.dumps(records([step])[0])
    return line[:len(line) // 2]


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_torn_last_record_is_dropped_with_one_warning_naming_the_file(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines([1, 2, 3]) + torn(4))
    assert metrics_file.read(path) == records([1, 2, 3])
    assert metrics_file.read(path) == records([1, 2, 3])
    (warning,) = warnings(caplog)  # once, however often the file is read
    assert warning.startswith(f"{path}:4: dropped a partial last record") and "\n" not in warning


def test_every_reader_reads_past_a_torn_record(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(lines([1, 2, 3]) + torn(4))
    assert exit_codes.run(report.main, "python -m eval.report", [str(run), "--out", str(tmp_path / "report")]) == 0
    assert "error" not in capsys.readouterr().err
    assert report.read_metrics(run) == records([1, 2, 3])
    assert estimate.from_metrics([run]).seconds == 2.5  # the median of 1.5, 2.5, 3.5


def test_the_resume_rewrite_drops_a_torn_record_and_appends_whole_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines([1, 2, 3]) + torn(4))
    metrics_file.truncate_after(path, 10)  # a resume past every record: only the torn one goes
    assert path.read_text() == lines([1, 2, 3])
    path.write_text(lines([1, 2, 3]) + torn(4))
    metrics_file.truncate_after(path, 2)
    metrics_file.MetricsFile(path).append(records([3, 4]))
    assert path.read_text() == lines([1, 2, 3, 4])


@pytest.mark.parametrize("text, line, message", [
    (lines([1]) + torn(2) + "\n" + lines([3]), 2, "invalid JSON"),   # a torn line that is not the last one
    (lines([1, 2]) + torn(3) + "\n", 3, "invalid JSON"),            # its newline was written: not a write cut short
    (lines([1]) + '{"loss": 3}', 2, r"record lacks \['step'\]"),     # whole, but not a record
], ids=["before-the-last", "with-its-newline", "no-step"])
def test_a_malformed_line_that_is_not_a_torn_last_record_is_an_error_naming_it(tmp_path, text, line, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    for read in (metrics_file.read, lambda p: metrics_file.truncate_after(p, 10)):
        with pytest.raises(ValueError, match=rf"^{path}:{line}: {message}"):
            read(path)
    assert path.read_text() == text
