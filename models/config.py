"""ModelConfig: one frozen dataclass for every supported decoder, built from / written to a Hugging Face config.json.

Hugging Face fields describe the network; runtime fields (dtypes, layer layout, remat, attention backend) describe how it
runs and never change the math beyond floating-point rounding. Any config field that would change the math and is not
implemented raises `UnsupportedConfigError` naming the field: silently ignoring it would give a different network.
"""
from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_BACKENDS = ("xla", "cudnn", "splash")


class UnsupportedConfigError(ValueError):
    """A config.json names an architecture or a math-changing option this package does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (`rope_type: llama3`), the only scaling implemented."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":
            raise UnsupportedConfigError(f"rope_scaling type {self.rope_type!r} is not implemented (only 'llama3')")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- network (Hugging Face) fields
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    init_std: float = 0.02
    # --- runtime fields
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "xla"
    # splash only: None runs the real kernel when compiling for TPU devices and Pallas interpret mode otherwise;
    # True/False force it (e.g. False to check, on a CPU host, that a splash config lowers to Mosaic).
    splash_interpret: bool | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedConfigError(
                f"architecture {self.architecture!r} is not supported; supported: {sorted(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"ModelConfig.attention={self.attention!r}; expected one of {ATTENTION_BACKENDS}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **runtime: Any) -> "ModelConfig":
        """Builds a config from a Hugging Face config.json dict; `runtime` sets param_dtype, scan_layers, etc."""
        architecture = _architecture(hf)
        model_type = ARCHITECTURES[architecture]
        if hf.get("model_type", model_type) != model_type:
            raise UnsupportedConfigError(
                f"config.json: model_type {hf.get('model_type')!r} does not match architecture {architecture}")
        _reject_unimplemented(hf, model_type)
        num_heads = int(hf["num_attention_heads"])
        theta, scaling = _rope(hf)
        fields = dict(
            architecture=architecture,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
        unknown = set(runtime) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"ModelConfig.from_hf: unknown runtime fields {sorted(unknown)}")
        return cls(**{**fields, **runtime})

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face config.json dict (without torch_dtype, which the exporter sets)."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(dataclasses.asdict(self.rope_scaling))
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.init_std,
            "tie_word_embeddings": self.tie_embeddings,
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
        }
        if self.model_type == "llama":
            out["mlp_bias"] = False
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            out.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * self.num_layers)
            if self.model_type == "qwen2":
                del out["attention_bias"]  # Qwen2 always has q/k/v biases; its config has no such field
        return out


def _architecture(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    if not archs:
        by_type = {v: k for k, v in ARCHITECTURES.items()}
        if hf.get("model_type") in by_type:
            return by_type[hf["model_type"]]
        raise UnsupportedConfigError(
            f"config.json names no architecture (model_type={hf.get('model_type')!r}); supported: {sorted(ARCHITECTURES)}")
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedConfigError(f"architecture {archs} is not supported; supported: {sorted(ARCHITECTURES)}")
    return archs[0]


def _reject_unimplemented(hf: dict[str, Any], model_type: str) -> None:
    """Raises for options that change the network's math and are not implemented here."""
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfigError(f"config.json: hidden_act={hf['hidden_act']!r} is not implemented (only 'silu')")
    if hf.get("mlp_bias"):
        raise UnsupportedConfigError("config.json: mlp_bias=true is not implemented")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise UnsupportedConfigError(f"config.json: attention_bias=true is not implemented for {model_type}")
    if model_type in ("qwen2", "qwen3"):
        layer_types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            raise UnsupportedConfigError(
                f"config.json: per-layer sliding-window attention ({model_type} use_sliding_window/layer_types) "
                "is not implemented")


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Rope theta and scaling, read exactly as transformers 5 reads them (`RotaryEmbeddingConfigMixin.
    convert_rope_params_to_dict`): a non-empty legacy `rope_scaling` replaces `rope_parameters` whole; `rope_theta`
    comes from the chosen dict, else the top-level field, else 10000; llama3's `original_max_position_embeddings`
    from the chosen dict, else `max_position_embeddings`. Unimplemented rope types raise naming the field."""
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = dict(hf.get(field) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedConfigError(f"config.json: {field} per layer type ({sorted(params)}) is not implemented")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        raise UnsupportedConfigError(f"config.json: {field}.partial_rotary_factor={partial} is not implemented (only 1)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedConfigError(
            f"config.json: {field}.rope_type={rope_type!r} is not implemented (only 'default' and 'llama3')")
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))),
        )
    except KeyError as e:
        raise UnsupportedConfigError(f"config.json: llama3 {field} lacks {e.args[0]!r}") from None
    return theta, scaling
