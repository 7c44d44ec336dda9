"""trainer.config: gin files, macros, flags and the errors that must name the binding before anything compiles."""
import argparse
import math

import jax
import pytest
from flax import nnx

from models.transformer import Transformer
from trainer import config


def test_default_is_the_demo_run():
    run = config.load([])
    assert run.model_dir == "./runs/demo" and run.train_steps == 300 and run.seed == 0
    assert [c.name for c in run.mixture.components] == ["replay", "synthetic"]
    assert run.mixture.weights == {"replay": 0.9, "synthetic": 0.1}
    assert run.train.batch_size == run.mixture.batch_size == 8
    assert run.checkpoint.every == 100
    assert "TRAIN_STEPS = 300" in run.gin_text


def test_flags_rewrite_and_override():
    parser = config.add_gin_flags(argparse.ArgumentParser())
    args = parser.parse_args(["--gin_file=runs/demo.gin", "--gin.TRAIN_STEPS=7", "--gin.MODEL_DIR=/tmp/x y",
                              "--gin.MIXTURE_WEIGHTS={'replay': 0.95, 'synthetic': 0.05}",
                              "--gin.OptimizerConfig.schedule='constant'", "--gin_search_paths=/a,/b"])
    assert args.gin_search_paths == ["/a", "/b"]
    run = config.load(args.gin_file, args.gin_bindings)
    assert run.train_steps == 7 and run.model_dir == "/tmp/x y"
    assert run.mixture.weights == {"replay": 0.95, "synthetic": 0.05}
    assert run.optimizer.schedule == "constant"


@pytest.mark.parametrize("binding, names", [
    ("TrainConfg.train_steps = 3", ["TrainConfg"]),                       # unknown configurable
    ("TrainConfig.train_step = 3", ["train_step"]),                        # unknown parameter
    ("TRAIN_STEP = 3", ["TRAIN_STEP"]),                                    # misspelled macro
    ("TRAIN_STEPS = -1", ["Config.train_steps", "TRAIN_STEPS"]),           # invalid value (Train- or MixtureConfig)
    ("TRAIN_STEPS = 'ten'", ["Config.train_steps", "TRAIN_STEPS"]),        # wrong type
    ("BATCH_SIZE = 0", ["batch_size", "BATCH_SIZE"]),
    ("CHECKPOINT_EVERY = 0", ["CheckpointConfig.every", "CHECKPOINT_EVERY"]),
    ("MIXTURE_WEIGHTS = {'replay': 0.5, 'synthtic': 0.5}", ["synthtic", "MIXTURE_WEIGHTS"]),
    ("MIXTURE_WEIGHTS = {'replay': -1.0, 'synthetic': 0.5}", ["replay", "MIXTURE_WEIGHTS"]),
    ("OptimizerConfig.schedule = 'cosine'", ["OptimizerConfig.schedule", "cosine"]),
    ("TrainConfig.mesh = {'data': 2, 'model': 4}", ["TrainConfig.mesh", "model"]),
    ("TrainConfig.mesh = {'fsdp': 4, 'dcn_data': -1}", ["TrainConfig.mesh", "dcn_data"]),
    ("TrainConfig.loss_chunk = 0", ["TrainConfig.loss_chunk"]),
    ("ModelConfig.remat = 'sometimes'", ["ModelConfig.remat"]),
    ("SEQ_LEN = 4096", ["SEQ_LEN", "max_position_embeddings"]),
    ("TrainConfig.batch_size = 32", ["TrainConfig", "MixtureConfig", "BATCH_SIZE"]),
    ("TrainConfig.probe_every = 0", ["TrainConfig.probe_every"]),
    ("TrainConfig.probe_sets = 'eval/probe_sets/animal_welfare.jsonl'", ["TrainConfig.probe_sets", "tuple"]),
    ("TrainConfig.probe_control = 'eval/probe_sets/neutral_control.jsonl'", ["TrainConfig.probe_control",
                                                                            "TrainConfig.probe_sets"]),
    ("TRAIN_STEP = 10", ["TRAIN_STEP are bound but never used"]),          # a macro nothing reads
])
def test_bad_bindings_name_the_binding(binding, names):
    with pytest.raises(config.ConfigError) as err:
        config.load([], [binding])
    for name in names:
        assert name in str(err.value), str(err.value)


def test_missing_file_and_missing_base(tmp_path):
    with pytest.raises(config.ConfigError, match="nope.gin"):
        config.load(["runs/nope.gin"])
    bare = tmp_path / "bare.gin"
    bare.write_text("include 'models/tiny.gin'\n")
    with pytest.raises(config.ConfigError, match="base.gin"):
        config.load([str(bare)])
    with pytest.raises(config.ConfigError, match="MODEL_DIR"):
        config.load(["runs/demo.gin"], ["MODEL_DIR = None"])


def test_search_paths_and_operative_config_round_trip(tmp_path):
    (tmp_path / "mine.gin").write_text("include 'runs/demo.gin'\nTRAIN_STEPS = 11\n")
    run = config.load(["mine.gin"], ["SEED = 3"], search_paths=[str(tmp_path)])
    assert run.train_steps == 11 and run.seed == 3 and run.mixture.seed == 3
    path = config.write_operative_config(run, tmp_path / "run")
    again = config.load([str(path)])
    assert again == run


PUBLISHED = {  # parameter counts of the released checkpoints
    "smollm2_135m": 134_515_008,
    "llama3_2_1b": 1_235_814_400,
    "llama3_1_8b": 8_030_261_248,
    "qwen3_0_6b": 596_049_920,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_configs_have_published_shapes(name):
    run = config.load(["runs/demo.gin", f"models/{name}.gin"])
    model = nnx.eval_shape(lambda: Transformer(run.model, rngs=nnx.Rngs(0)))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == PUBLISHED[name]
