"""ModelConfig: HF round trip and clear errors for unsupported architectures and math-changing options."""
from __future__ import annotations

import pytest

from models.config import ModelConfig, RopeScaling, UnsupportedConfigError

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": [2, 3],
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def test_from_hf_reads_fields_and_runtime():
    c = ModelConfig.from_hf(LLAMA, param_dtype="bfloat16", scan_layers=False)
    assert (c.head_dim, c.num_kv_heads, c.tie_embeddings, c.rope_theta) == (16, 2, True, 500000.0)
    assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert c.eos_token_ids == (2, 3) and c.param_dtype == "bfloat16" and not c.scan_layers
    assert ModelConfig.from_hf(c.to_hf()) == c.replace(param_dtype="float32", scan_layers=True)


def test_legacy_rope_fields_are_read():
    legacy = {k: v for k, v in LLAMA.items() if k != "rope_parameters"}
    legacy.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(LLAMA)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
ROPE_CASES = [  # config.json rope fields as released checkpoints and older/newer transformers write them
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_scaling": {"rope_type": "default"}},
    {"rope_parameters": {**LLAMA3, "rope_theta": 5e5, "original_max_position_embeddings": 1024},
     "rope_scaling": {"rope_type": "default"}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "rope_scaling": {**LLAMA3, "type": "llama3"}},
    {"rope_theta": 1234.0, "rope_scaling": LLAMA3, "original_max_position_embeddings": 1024},
    {"rope_theta": 1234.0, "rope_parameters": {"rope_type": "default", "rope_theta": 99.0}},
    {"rope_theta": 1234.0, "rope_parameters": {"rope_type": "default"}},
    {"rope_scaling": {}, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}},
    {"rope_scaling": None, "rope_parameters": None},
]


@pytest.mark.parametrize("rope", ROPE_CASES)
def test_rope_fields_are_read_as_transformers_reads_them(rope):
    """Both rope_parameters and rope_scaling present, legacy and new fields, defaults: the theta and scaling that
    transformers 5 builds from the same config.json (the numerical reference)."""
    import transformers

    hf = {**{k: v for k, v in LLAMA.items() if k != "rope_parameters"}, "max_position_embeddings": 4096, **rope}
    reference = transformers.LlamaConfig.from_dict(hf).rope_parameters
    c = ModelConfig.from_hf(hf)
    assert c.rope_theta == reference["rope_theta"]
    if reference["rope_type"] == "default":
        assert c.rope_scaling is None
    else:
        assert c.rope_scaling == RopeScaling(reference["factor"], reference["low_freq_factor"],
                                             reference["high_freq_factor"],
                                             reference["original_max_position_embeddings"])


def test_rope_scaling_wins_over_rope_parameters_and_yarn_is_refused():
    """transformers reads this config as yarn (rope_scaling replaces rope_parameters), which is not implemented."""
    hf = {**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UnsupportedConfigError, match=r"rope_scaling\.rope_type='yarn' is not implemented"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("arch,extra,flag", [
    ("Qwen2ForCausalLM", {}, "qkv_bias"),
    ("Qwen3ForCausalLM", {"head_dim": 24}, "qk_norm"),
])
def test_architecture_flags(arch, extra, flag):
    hf = {**LLAMA, "architectures": [arch], "model_type": arch[:5].lower(), **extra}
    c = ModelConfig.from_hf(hf)
    assert getattr(c, flag) and ModelConfig.from_hf(c.to_hf()) == c


def test_mistral_sliding_window():
    hf = {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 4096}
    assert ModelConfig.from_hf(hf).sliding_window == 4096
    assert ModelConfig.from_hf({**LLAMA, "sliding_window": 4096}).sliding_window is None  # Llama has no window


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"model_type": "qwen2"}, "model_type"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True}, "sliding-window"),
    ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
      "layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "low_freq_factor"),
])
def test_unsupported_is_a_clear_error(change, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        ModelConfig.from_hf({**LLAMA, **change})


@pytest.mark.parametrize("runtime,message", [
    ({"param_dtype": "float16"}, "param_dtype"),
    ({"remat": "some"}, "remat"),
    ({"attention": "flash"}, "attention"),
    ({"scan": True}, "unknown runtime"),
])
def test_runtime_validation(runtime, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ModelConfig.from_hf(LLAMA, **runtime)


def test_bad_head_grouping():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.from_hf({**LLAMA, "num_key_value_heads": 3})
