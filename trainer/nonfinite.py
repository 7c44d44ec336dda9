"""A step whose loss or gradient norm is NaN/Inf: the error that stops the run, and its message (what stopped, which
checkpoint is good, what a rerun resumes from)."""
from __future__ import annotations

from typing import Any

import numpy as np

import exit_codes
from trainer import checkpoint


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm of `step` became NaN/Inf; the run stopped without saving that state."""
    exit_code = exit_codes.STOPPED

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def what(m: dict[str, Any]) -> str:
    """Which of a step's loss and gradient norm are NaN/Inf: "loss", "gradient norm", "loss and gradient norm" or
    "" (both finite)."""
    bad = [name for name, key in (("loss", "loss"), ("gradient norm", "grad_norm")) if not np.isfinite(m[key])]
    return " and ".join(bad)


def message(step: int, m: dict[str, Any], what: str, ckpt: checkpoint.Checkpointer,
                       bad: list[int]) -> str:
    """What stopped, which checkpoint is good, what a rerun resumes from (Checkpointer.restore_resumable's choice)."""
    finite = " (the loss is finite)" if what == "gradient norm" else ""
    text = (f"step {step}: non-finite {what}{finite}: loss={m['loss']} grad_norm={m['grad_norm']}; stopped without "
            "saving.")
    if bad:
        text += (f" Checkpoints {bad} hold the parameters that gave this {what} (or came after them): they are kept, "
                 "marked, and set aside by the next run.")
    good, resume = ckpt.newest_good(), ckpt.resume_candidate()
    if good is not None:
        text += (f" The last good checkpoint is {ckpt.directory}/{good} (step {good + 1}'s loss, computed from its "
                 "parameters, was finite).")
    if resume is None:
        return text + (" No checkpoint remains to resume from: a rerun starts from the beginning. Lower the learning "
                       "rate or check the data, then rerun.")
    if resume != good:
        text += f" A rerun resumes from {ckpt.directory}/{resume} (not yet verified by a finite loss)."
    return text + (f" Lower the learning rate (adding --gin.OptimizerConfig.schedule_start={resume} starts its "
                   f"schedule anew at step {resume}) or check the data, then rerun to resume from step {resume}.")
