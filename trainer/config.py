"""gin at the edge: the configurables, the run macros, the command-line flags and `load() -> RunConfig`.

A run is configured T5X-style: `--gin_file=runs/demo.gin [--gin_file=...] [--gin.KEY=VALUE ...] [--gin_search_paths=a,b]`.
Every run file includes `base.gin`, which defines the macros every run understands (`KNOWN_MACROS`) and wires them
into the configurables. `load()` parses, builds the frozen `RunConfig` and validates it, so unknown configurables,
misspelled parameters or macros, and invalid values all fail here, naming the binding, before anything compiles.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import logging
import pathlib
import re
import tokenize
from typing import Any, Sequence

import gin

import storage
from data.config import Component, MixtureConfig
from models.config import ModelConfig, RopeScaling
from trainer.demo_assets import demo_asset
from trainer.run_config import CheckpointConfig, OptimizerConfig, TrainConfig

CONFIG_ROOT = pathlib.Path(__file__).resolve().parents[1] / "t5x_configs"
DEFAULT_RUN = "runs/demo.gin"
KNOWN_MACROS = ("MODEL_DIR", "TRAIN_STEPS", "BATCH_SIZE", "SEQ_LEN", "SEED", "CHECKPOINT_EVERY", "MIXTURE_WEIGHTS")
# Which macro base.gin wires into a field, so a validation error names what the user actually typed.
FIELD_MACROS = {"TrainConfig.model_dir": "MODEL_DIR", "TrainConfig.train_steps": "TRAIN_STEPS",
                "TrainConfig.batch_size": "BATCH_SIZE", "TrainConfig.seq_len": "SEQ_LEN", "TrainConfig.seed": "SEED",
                "CheckpointConfig.every": "CHECKPOINT_EVERY", "MixtureConfig.weights": "MIXTURE_WEIGHTS",
                "MixtureConfig.seq_len": "SEQ_LEN", "MixtureConfig.batch_size": "BATCH_SIZE",
                "MixtureConfig.train_steps": "TRAIN_STEPS"}


class ConfigError(ValueError):
    """A gin file, binding or value is wrong; the message names it."""


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


def add_gin_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds `--gin_file` (repeatable), `--gin_search_paths` (comma-separated) and `--gin.KEY=VALUE` bindings.

    `--gin.KEY=VALUE` is rewritten to `--gin_bindings "KEY = VALUE"` before argparse sees it (as T5X does), so
    `parser.parse_args()` returns `args.gin_file`, `args.gin_bindings` and `args.gin_search_paths`. A VALUE that is
    not a Python literal or gin reference (e.g. `--gin.MODEL_DIR=/tmp/run`) is taken as a string.
    """
    parser.add_argument("--gin_file", action="append", default=[], help="gin file; repeatable, later files win")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a gin binding 'KEY = VALUE'; repeatable. Shorter: --gin.KEY=VALUE, e.g. "
                             "--gin.TRAIN_STEPS=100 --gin.MIXTURE_WEIGHTS=\"{'replay': 0.9, 'synthetic': 0.1}\"")
    parser.add_argument("--gin_search_paths", type=lambda s: [p for p in s.split(",") if p], default=[],
                        help="comma-separated folders searched for gin files and includes (t5x_configs/ always is)")
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        import sys
        argv = list(sys.argv[1:] if args is None else args)
        return original(rewrite_gin_args(argv), namespace)

    parser.parse_known_args = parse_known_args
    return parser


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """`--gin.KEY=VALUE` -> `--gin_bindings=KEY = VALUE`; other arguments unchanged."""
    out = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            key, value = arg[len("--gin."):].split("=", 1)
            out.append(f"--gin_bindings={key} = {_literal_or_string(value)}")
        elif arg.startswith("--gin."):
            raise ConfigError(f"{arg}: expected --gin.KEY=VALUE")
        else:
            out.append(arg)
    return out


def _literal_or_string(value: str) -> str:
    text = value.strip()
    if text.startswith(("@", "%")) or text in ("None", "True", "False"):
        return text
    try:
        ast.literal_eval(text)
        return text
    except (ValueError, SyntaxError):
        return repr(text)


def _gin_message(error: Exception) -> str:
    """gin's parse error as one line. A value that is not a literal (`nan`, a bare word) is named as such, not by the
    Python AST node gin's parser failed on."""
    text = str(error).strip()
    if isinstance(error, tokenize.TokenError):  # Python's tokenizer: an unclosed bracket or string
        text = f"{error.args[0]} (an unclosed bracket or quote)"
    token = re.search(r"Failed to parse token '([^']*)'( \([^)]*\))?", text)
    if token and "<ast." in text:
        where = token.group(2) or ""
        where = " (in --gin_bindings)" if where.startswith(" (line ") else where  # no file: a binding
        special = "NaN and infinity have no Python literal; " if token.group(1).lower() in ("nan", "inf") else ""
        text = (f"cannot parse {token.group(1)!r}{where}: {special}a value must be a Python literal (a number, "
                "string, list, tuple, dict, True, False or None), an @configurable or a %MACRO")
    return "gin: " + re.sub(r"\s*\n\s*", "; ", text)


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
    gin.clear_config()
    for path in [*search_paths, ".", str(CONFIG_ROOT)]:
        if path not in gin.config._LOCATION_PREFIXES:  # gin has no public getter; append-only list of prefixes
            gin.add_config_file_search_path(path)
    files = list(gin_files) or [DEFAULT_RUN]
    try:
        with _quiet_search(), _plain_files_only():
            gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
    except (ValueError, IOError, SyntaxError, tokenize.TokenError) as e:  # gin names the file and line
        raise ConfigError(_gin_message(e)) from e
    _check_macros()


def bound(selector: str) -> Any:
    """After `parse`: the value bound to `selector` (`TrainConfig.model_dir`, `INIT_FROM/macro.value`) with macros
    resolved, or None when nothing binds it."""
    try:
        value = gin.query_parameter(selector)
    except ValueError:
        return None
    while isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        value = gin.query_parameter(value.scoped_selector.split("/")[0] + "/macro.value")
    return value


@contextlib.contextmanager
def _plain_files_only():
    """Reads gin files from the file system, or from a URL (a run's gs:// config.gin) through `storage`.

    gin's second reader treats `a/b.gin` as file b.gin of Python package `a`; when the working directory holds a plain
    folder of that name (the demo's own `./runs/` output, say) it finds a namespace package and crashes with a
    TypeError instead of moving on. docmix never ships configs inside Python packages, so that reader is left out.
    """
    readers = list(gin.config._FILE_READERS)  # gin has no public way to choose readers
    gin.config._FILE_READERS[:] = [(reader, exists) for reader, exists in readers if reader is open] + [
        (lambda path: storage.Path(path).open(), lambda path: storage.is_remote(path) and storage.Path(path).is_file())]
    try:
        yield
    finally:
        gin.config._FILE_READERS[:] = readers


@contextlib.contextmanager
def _quiet_search():
    """gin's resource reader logs every search-path prefix it tries (a miss at ERROR); a real miss still raises."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.pathname.endswith("resource_reader.py")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


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
    return {scope for scope, selector in gin.config._CONFIG if selector == "gin.macro"}


def _check_macros() -> None:
    missing = [m for m in KNOWN_MACROS if m not in _bound_macros()]
    if missing:
        raise ConfigError(f"macro(s) {', '.join(missing)} not defined: a run file must include 'base.gin'")


def _unused_macros() -> set[str]:
    operative = gin.operative_config_str()
    used = {line.split("=", 1)[0].strip() for line in operative.splitlines() if "=" in line}
    return {m for m in _bound_macros() if m not in used and m not in KNOWN_MACROS}


def write_operative_config(run: RunConfig, model_dir: str | pathlib.Path) -> storage.Path:
    """Writes the operative gin config to MODEL_DIR/config.gin (local or gs://) and returns its path."""
    path = storage.Path(model_dir) / "config.gin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run.gin_text)
    return path

