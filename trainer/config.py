"""A run's configuration: the gin configurables, the run macros and `load() -> RunConfig`.

A run is configured T5X-style: `--gin_file=runs/demo.gin [--gin_file=...] [--gin.KEY=VALUE ...] [--gin_search_paths=a,b]`
(the flags and the parsing itself: `ginfiles`, re-exported here). Every run file includes `base.gin`, which defines
the macros every run understands (`KNOWN_MACROS`) and wires them into the configurables. `load()` parses, builds the
frozen `RunConfig` and validates it, so unknown configurables, misspelled parameters or macros, and invalid values all
fail here, naming the binding, before anything compiles.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Sequence

import gin

import ginfiles
import repo
import storage
from ginfiles import ConfigError, add_gin_flags, bound  # noqa: F401 (the trainer's config API)
from data.config import Component, MixtureConfig
from models.config import ModelConfig, RopeScaling
from trainer.demo_assets import demo_asset
from trainer.run_config import CheckpointConfig, OptimizerConfig, TrainConfig

CONFIG_ROOT = repo.ROOT / "t5x_configs"
DEFAULT_RUN = "runs/demo.gin"
KNOWN_MACROS = ("MODEL_DIR", "TRAIN_STEPS", "BATCH_SIZE", "SEQ_LEN", "SEED", "CHECKPOINT_EVERY", "MIXTURE_WEIGHTS")
# Which macro base.gin wires into a field, so a validation error names what the user actually typed.
FIELD_MACROS = {"TrainConfig.model_dir": "MODEL_DIR", "TrainConfig.train_steps": "TRAIN_STEPS",
                "TrainConfig.batch_size": "BATCH_SIZE", "TrainConfig.seq_len": "SEQ_LEN", "TrainConfig.seed": "SEED",
                "CheckpointConfig.every": "CHECKPOINT_EVERY", "MixtureConfig.weights": "MIXTURE_WEIGHTS",
                "MixtureConfig.seq_len": "SEQ_LEN", "MixtureConfig.batch_size": "BATCH_SIZE",
                "MixtureConfig.train_steps": "TRAIN_STEPS"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, resolved and validated. `gin_text` is the operative config (written to config.gin).

    `eval_mixture` (optional, usually `@eval/MixtureConfig()` inheriting the unscoped bindings): held-out components
    whose loss is measured every `TrainConfig.eval_every` steps, each component on its own single unshuffled pass
    (`data.config.single_component_mixture`, as eval.heldout reads it), the first `TrainConfig.eval_batches` batches
    of it (None: the whole pass).
    """
    model: ModelConfig
    mixture: MixtureConfig
    train: TrainConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval_mixture: MixtureConfig | None = None
    gin_text: str = dataclasses.field(default="", compare=False, repr=False)

    @property
    def model_dir(self) -> str:
        return self.train.model_dir

    @property
    def train_steps(self) -> int:
        return self.train.train_steps

    @property
    def seed(self) -> int:
        return self.train.seed


def model_from_init(path: str | None, runtime: dict[str, Any] | None = None) -> ModelConfig:
    """The network config of INIT_FROM (its config.json, or a docmix run's checkpoint metadata) with the runtime
    fields in `runtime` (e.g. {'remat': 'full'}; the others keep their defaults).

    Run files bind `RunConfig.model = @model_from_init()` and `model_from_init.path = %INIT_FROM`, so one run file
    works for any supported model. Raises ValueError naming the binding when INIT_FROM is unset or unreadable.
    """
    from trainer import checkpoint, initialize, run_metadata  # jax/orbax: only for run files that need them

    runtime = dict(runtime or {})
    unknown = sorted(set(runtime) - set(initialize.RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"model_from_init.runtime: unknown field(s) {unknown}; "
                         f"runtime fields: {list(initialize.RUNTIME_FIELDS)}")
    if not path:
        raise ValueError("model_from_init.path: INIT_FROM is not set; pass --gin.INIT_FROM=DIR (a Hugging Face "
                         "folder with config.json, or a docmix run directory)")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in initialize.RUNTIME_FIELDS}
    source = storage.Path(path)
    try:
        if (source / "config.json").is_file():
            from models import hf_io

            return hf_io.read_config(source, **{**defaults, **runtime})
        if source.is_dir():
            meta = checkpoint.read_metadata(source)[3]
            return run_metadata.model_config_from_dict(meta["model_config"]).replace(**{**defaults, **runtime})
    except (OSError, KeyError) as e:
        raise ValueError(f"INIT_FROM={path}: cannot read its model config: {e}") from None
    raise ValueError(f"INIT_FROM={path}: no such directory (expected a Hugging Face folder with config.json or a "
                     "docmix run directory)")


for _fn in (ModelConfig, RopeScaling, MixtureConfig, Component, TrainConfig, OptimizerConfig, CheckpointConfig,
            RunConfig, demo_asset, model_from_init):
    gin.external_configurable(_fn, name=_fn.__name__)


def load(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> RunConfig:
    """Parses gin files then bindings (later wins) and returns the validated RunConfig.

    With no gin files the embedded demo run (`runs/demo.gin`) is used. Raises ConfigError naming the file,
    binding, macro or field at fault.
    """
    parse(gin_files, bindings, search_paths)
    try:
        run = gin.get_configurable(RunConfig)()
    except (TypeError, ValueError) as e:  # dataclass validation; gin appends the configurable it was building
        raise ConfigError(_name_macros(str(e))) from e
    unused = _unused_macros()
    if unused:
        raise ConfigError(f"macro(s) {', '.join(sorted(unused))} are bound but never used (a typo?); "
                          f"macros every run understands: {', '.join(KNOWN_MACROS)}")
    _check_consistent(run)
    return dataclasses.replace(run, gin_text=gin.operative_config_str())


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> None:
    """The first half of `load`: parses the files and bindings into gin's config and checks the macros, building
    nothing and reading nothing the run names (INIT_FROM, corpora); `bound()` then reads single values."""
    ginfiles.parse(list(gin_files) or [DEFAULT_RUN], bindings, [*search_paths, ".", str(CONFIG_ROOT)])
    _check_macros()


def _name_macros(message: str) -> str:
    """One line: gin's "In call to configurable 'X' (<object>)" becomes "[in X]", and the macro behind each
    `Class.field` the message names is appended (e.g. TrainConfig.train_steps -> TRAIN_STEPS)."""
    message = re.sub(r"\s*In call to configurable '([^']+)' \(<[^>]*>\)", r" [in \1]", message)
    macros = [m for field, m in FIELD_MACROS.items() if re.search(re.escape(field) + r"\b", message)]
    return message + (f" [set by macro {', '.join(dict.fromkeys(macros))}]" if macros else "")


def _check_consistent(run: RunConfig) -> None:
    """Cross-object checks that no single dataclass can make."""
    t, m = run.train, run.mixture
    steps = m.train_steps or t.train_steps  # None: a mixture laid out open-ended
    if (t.batch_size, t.seq_len, t.seed, t.train_steps) != (m.batch_size, m.seq_len, m.seed, steps):
        raise ConfigError(f"TrainConfig (batch_size={t.batch_size}, seq_len={t.seq_len}, seed={t.seed}, train_steps="
                          f"{t.train_steps}) and MixtureConfig (batch_size={m.batch_size}, seq_len={m.seq_len}, "
                          f"seed={m.seed}, train_steps={m.train_steps}) disagree; bind BATCH_SIZE, SEQ_LEN, SEED and "
                          "TRAIN_STEPS instead of the fields")
    e = run.eval_mixture
    if e is not None and ((e.batch_size, e.seq_len) != (t.batch_size, t.seq_len) or e.tokenizer != m.tokenizer):
        # The eval step is compiled for the training batch shape and scores with the training tokenizer.
        raise ConfigError(f"RunConfig.eval_mixture (batch_size={e.batch_size}, seq_len={e.seq_len}, "
                          f"tokenizer={e.tokenizer!r}) must match the training mixture (batch_size={m.batch_size}, "
                          f"seq_len={m.seq_len}, tokenizer={m.tokenizer!r})")
    if run.model.param_dtype != "float32":
        # fp32 master weights: an AdamW update (~learning rate per step) is below half a bf16 ulp for any |w| above
        # lr * 2^8 (0.005 at lr 2e-5), so bf16 parameters would leave most of a pretrained matrix unchanged.
        raise ConfigError(f"ModelConfig.param_dtype={run.model.param_dtype!r}: training keeps float32 master weights "
                          "and optimizer moments (with bfloat16 parameters, updates at midtraining learning rates are "
                          "rounded away for most weights). Set ModelConfig.param_dtype='float32'; "
                          "ModelConfig.compute_dtype='bfloat16' keeps the matmuls in bf16, and "
                          "OptimizerConfig.mu_dtype='bfloat16' halves the first moment's memory.")
    if t.seq_len > run.model.max_position_embeddings:
        raise ConfigError(f"SEQ_LEN={t.seq_len} exceeds ModelConfig.max_position_embeddings="
                          f"{run.model.max_position_embeddings}")


def _bound_macros() -> set[str]:
    return ginfiles.macros(gin.config_str())


def _check_macros() -> None:
    missing = [m for m in KNOWN_MACROS if m not in _bound_macros()]
    if missing:
        raise ConfigError(f"macro(s) {', '.join(missing)} not defined: a run file must include 'base.gin'")


def _unused_macros() -> set[str]:
    used = ginfiles.macros(gin.operative_config_str())
    return {m for m in _bound_macros() if m not in used and m not in KNOWN_MACROS}


def write_operative_config(run: RunConfig, model_dir: str | pathlib.Path) -> storage.Path:
    """Writes the operative gin config to MODEL_DIR/config.gin (local or gs://) and returns its path."""
    path = storage.Path(model_dir) / "config.gin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run.gin_text)
    return path

