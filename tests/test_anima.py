"""ANIMA through Inspect, offline: exact aggregation with a scripted grader, and SmolLM2 end to end (HF folder)."""
import json
import re

import pytest

from tests import extras

pytestmark = extras.require("eval")

import torch  # noqa: E402
from inspect_ai.log import read_eval_log  # noqa: E402
from inspect_ai.model import ModelOutput, ModelUsage, get_model  # noqa: E402

from eval import anima  # noqa: E402


def _output(text):
    out = ModelOutput.from_content("mockllm/model", text)
    # Preset usage: mockllm would otherwise count tokens with tiktoken, which downloads its encoding.
    out.usage = ModelUsage(input_tokens=1, output_tokens=1, total_tokens=2)
    return out


def _grade_sentience_only(messages, tools, tool_choice, config):
    criterion = re.search(r"\[Criterion\]: (.*)", messages[-1].text).group(1).strip()
    return _output("GRADE: C" if criterion == "Sentience Acknowledgement" else "The answer lacks it.\nGRADE: I")


def test_scripted_grader_gives_exact_aggregates(anima_dir, tmp_path):
    model = get_model("mockllm/model", custom_outputs=lambda *a: _output("Fish have nociceptors."), memoize=False)
    grader = get_model("mockllm/model", custom_outputs=_grade_sentience_only, memoize=False, role="grader")
    out = tmp_path / "res" / "anima.json"
    result = anima.run(model, grader, dataset_dir=anima_dir, epochs=1, limit=2, out=out)
    # Question 0 is tagged {Evidence-Based, Sentience}; question 1 {Evidence-Based, Epistemic Humility, Sentience}.
    assert result["overall_mean"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert result["dimension_normalized_avg"] == pytest.approx(1 / 3)
    assert result["dimensions"] == {"Epistemic Humility": 0.0, "Evidence-Based Capacity Attribution": 0.0,
                                    "Sentience Acknowledgement": 1.0}
    assert (result["n_samples"], result["n_scored"], result["grades_attempted"], result["grades_unparseable"]) == (2, 2, 5, 0)
    assert json.loads(out.read_text()) == result
    assert result["dataset"]["source"] == "local" and result["revision"].startswith("local-")


def _grade_unparseable_evidence(messages, tools, tool_choice, config):
    criterion = re.search(r"\[Criterion\]: (.*)", messages[-1].text).group(1).strip()
    return _output("I cannot tell." if criterion == "Evidence-Based Capacity Attribution" else "GRADE: C")


def test_a_dimension_without_parseable_grade_is_left_out(anima_dir, tmp_path):
    # inspect_evals 0.26.0 crashed here (KeyError in its explanation); eval.anima patches that.
    model = get_model("mockllm/model", custom_outputs=lambda *a: _output("Fish have nociceptors."), memoize=False)
    grader = get_model("mockllm/model", custom_outputs=_grade_unparseable_evidence, memoize=False, role="grader")
    result = anima.run(model, grader, dataset_dir=anima_dir, epochs=1, limit=2, out=tmp_path / "anima.json")
    assert result["dimensions"] == {"Epistemic Humility": 1.0, "Sentience Acknowledgement": 1.0}
    assert result["overall_mean"] == 1.0 and result["grades_unparseable"] == 2 and result["n_scored"] == 2


def test_model_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        anima.resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="neither an existing HF folder"):
        anima.resolve_model("./no/such/dir")
    with pytest.raises(ValueError, match="--out is required"):
        anima.run("mockllm/model", "mockllm/model", dataset_dir=tmp_path)


@pytest.fixture
def one_torch_thread():
    """Inspect's hf provider runs torch in this process. Under `pytest -n 2` on 2 cores, torch's default OpenMP threads
    oversubscribe the CPU: SmolLM2 generated 16 tokens for 2 prompts in 31 s with 2 threads, 3.7 s with 1."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def check_real_run(result: dict, out_file, n_questions: int) -> None:
    """Generation, grading, parsing and aggregation in the log agree with the saved result."""
    assert json.loads(out_file.read_text()) == result
    log = read_eval_log(result["log"])
    assert log.status == "success" and len(log.samples) == n_questions
    grader_calls = 0
    for sample in log.samples:
        assert sample.output.completion.strip(), "the evaluated model produced no text"
        score = sample.scores["anima_scorer"]
        tags = json.loads(sample.target)["tags"]
        assert score.metadata["grades_attempted"] == len(tags)
        calls = [e for e in sample.events if e.event == "model" and e.role == "grader"]
        assert len(calls) == len(tags) and all(c.output.completion.strip() for c in calls)
        grader_calls += len(calls)
        parsed = [g for d in score.metadata["dimension_grades"].values() for v in d for g in v["by_grader"].values()
                  if g is not None]
        assert len(parsed) + score.metadata["grades_unparseable"] == len(tags)
    assert result["grades_attempted"] == grader_calls
    overall = [s.scores["anima_scorer"].value["overall"] for s in log.samples
               if isinstance(s.scores["anima_scorer"].value, dict)]
    assert result["n_scored"] == len(overall)
    if overall:
        assert result["overall_mean"] == pytest.approx(sum(overall) / len(overall))
    else:  # a 135M grader rarely writes "GRADE: C/I": nothing parseable is reported as null, never as 0
        assert result["overall_mean"] is None and result["dimensions"] == {}


@pytest.mark.slow
def test_smollm2_hf_folder_end_to_end(smollm2_dir, anima_dir, tmp_path, capsys, one_torch_thread):
    # A folder of links, so the result lands "beside the checkpoint" without writing into the shared fixture.
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in smollm2_dir.iterdir():
        (hf / f.name).symlink_to(f)
    anima.main(["--model", str(hf), "--grader", f"hf/{smollm2_dir}", "--dataset_dir", str(anima_dir),
                "--epochs", "1", "--limit", "2", "--max_tokens", "16", "--grader_max_tokens", "16"])
    assert "overall_mean" in json.loads(capsys.readouterr().out)
    result = json.loads((hf / "anima.json").read_text())
    assert result["inspect_model"] == f"hf/{hf}" and result["grader"] == f"hf/{smollm2_dir}"
    check_real_run(result, hf / "anima.json", n_questions=2)
