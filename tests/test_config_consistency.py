"""Cross-object config checks that must fail before anything compiles."""
import pytest

from trainer import config


@pytest.mark.parametrize("binding", ["eval/MixtureConfig.seq_len = 64", "eval/MixtureConfig.batch_size = 4",
                                     "eval/MixtureConfig.tokenizer = '/elsewhere/tokenizer.json'"])
def test_eval_mixture_must_match_the_training_batch_and_tokenizer(binding):
    with pytest.raises(config.ConfigError, match="eval_mixture"):
        config.load(["runs/demo.gin"], [binding])


def test_demo_eval_mixture_is_consistent():
    run = config.load(["runs/demo.gin"], [])
    assert run.eval_mixture.seq_len == run.mixture.seq_len and run.eval_mixture.tokenizer == run.mixture.tokenizer
