"""Tokenization with Hugging Face `tokenizers`: BOS/EOS policy, zero-loss prefixes, per-token target weights.

BOS/EOS policy (MixtureConfig.add_bos / add_eos = None means "the tokenizer's"):
- BOS: `add_bos_token` from tokenizer_config.json if set, else whether tokenizer.json's post-processor adds it.
- EOS: `add_eos_token` from tokenizer_config.json if set, else True whenever the tokenizer has an EOS token, because
  packed documents need a boundary token the model learns to predict.
`bos_token` / `eos_token` in the config (or MixtureConfig overrides) name the tokens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers

import storage
from data.chat_template import template_source
from data.config import MixtureConfig


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized document: tokens int32 [n], weights float32 [n] (target weight of each token)."""

    tokens: np.ndarray
    weights: np.ndarray


def tokenizer_files(path: str | pathlib.Path) -> tuple[storage.Path, dict, str | None]:
    """(tokenizer.json, tokenizer_config dict or {}, chat template or None) for a file or an HF folder (local or
    gs://)."""
    path = storage.Path(path)
    folder = path if path.is_dir() else path.parent
    tok_file = folder / "tokenizer.json" if path.is_dir() else path
    if not tok_file.is_file():
        raise FileNotFoundError(f"MixtureConfig.tokenizer: no tokenizer.json at {tok_file}")
    cfg = read_json(folder / "tokenizer_config.json")
    return tok_file, cfg, template_source(folder, cfg)


def read_json(path: storage.PathLike) -> dict:
    """A tokenizer folder's JSON file (tokenizer_config.json, generation_config.json) as a dict, {} when absent;
    a malformed one is a ValueError naming it."""
    return storage.read_json_object(path) if storage.Path(path).is_file() else {}


def load_tokenizer(path: storage.PathLike) -> tokenizers.Tokenizer:
    """The `tokenizers.Tokenizer` of a tokenizer.json file (local or gs://); one that `tokenizers` cannot read (cut
    short, not JSON, not a tokenizer) is a ValueError naming the file."""
    local = storage.local_file(path)
    try:
        return tokenizers.Tokenizer.from_file(str(local))
    except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception for every malformed file
        if type(e) is not Exception:
            raise
        raise ValueError(f"{path}: not a tokenizer.json that the tokenizers library can read ({e})") from None


def tokenizer_sha256(tokenizer: str | pathlib.Path) -> str:
    """sha256 of the tokenizer file: the identity that checkpoints and pre-tokenized shards are checked against."""
    return hashlib.sha256(tokenizer_files(tokenizer)[0].read_bytes()).hexdigest()


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class TextEncoder:
    """Picklable encoder: pieces of text, each trainable or not, -> Encoded. Loads the tokenizer lazily."""

    def __init__(self, config: MixtureConfig):
        self._path, cfg, self.chat_template = tokenizer_files(config.tokenizer)
        self._tok: tokenizers.Tokenizer | None = None
        tok = self.tokenizer
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._token_id(config.bos_token or _token_text(cfg.get("bos_token")), "bos_token")
        self.eos_id = self._token_id(config.eos_token or _token_text(cfg.get("eos_token")), "eos_token")
        self.bos_text = tok.id_to_token(self.bos_id) if self.bos_id is not None else None
        self.eos_text = tok.id_to_token(self.eos_id) if self.eos_id is not None else None
        if config.add_bos is not None:
            self.add_bos = config.add_bos
        elif "add_bos_token" in cfg:
            self.add_bos = bool(cfg["add_bos_token"])
        else:
            self.add_bos = self.bos_id is not None and tok.encode("a").ids[:1] == [self.bos_id]
        self.add_eos = config.add_eos if config.add_eos is not None else bool(cfg.get("add_eos_token", True))
        for flag, ident in (("add_bos", self.bos_id), ("add_eos", self.eos_id)):
            if getattr(self, flag) and ident is None:
                if getattr(config, flag):
                    raise ValueError(f"MixtureConfig.{flag}=True but the tokenizer has no such token; "
                                     f"set MixtureConfig.{flag[4:]}_token")
                setattr(self, flag, False)

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        if self._tok is None:
            self._tok = load_tokenizer(self._path)
        return self._tok

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    def _token_id(self, text: str | None, field: str) -> int | None:
        if text is None:
            return None
        ident = self.tokenizer.token_to_id(text)
        if ident is None:
            raise ValueError(f"{field} {text!r} is not a token of {self._path}")
        return ident

    def encode(self, pieces: Sequence[tuple[str, bool]], *, weight: float, bos: bool, eos: bool) -> Encoded:
        """Tokenizes "".join(texts) in one pass; a token is a target (weight) iff it starts inside a trainable piece.

        bos/eos: add the BOS (never a target) / EOS (a target with `weight`) tokens of the policy.
        """
        text = "".join(t for t, _ in pieces)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int32)
        flags = {train for t, train in pieces if t}
        if len(flags) == 1:  # one kind of text: no offsets needed
            weights = np.full(len(ids), np.float32(weight) if flags.pop() else np.float32(0))
        else:
            trainable = np.zeros(len(text) + 1, dtype=bool)
            pos = 0
            for t, train in pieces:
                trainable[pos:pos + len(t)] = train
                pos += len(t)
            starts = np.asarray(enc.offsets, dtype=np.int64).reshape(len(ids), 2)[:, 0]
            weights = np.where(trainable[starts], np.float32(weight), np.float32(0))
        if bos and self.add_bos and not (len(ids) and ids[0] == self.bos_id):
            ids = np.concatenate([[self.bos_id], ids]).astype(np.int32)
            weights = np.concatenate([[0.0], weights]).astype(np.float32)
        if eos and self.add_eos:
            ids = np.concatenate([ids, [self.eos_id]]).astype(np.int32)
            weights = np.concatenate([weights, [weight]]).astype(np.float32)
        return Encoded(ids, weights.astype(np.float32))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def check_vocab(tokenizer: str | pathlib.Path, model_vocab_size: int) -> int:
    """Raises ValueError when the tokenizer's ids do not fit the model's embedding; returns the tokenizer's size.

    Call at start-up with the model config's vocab_size (a model may pad its vocabulary, so smaller is fine).
    """
    tok_file, _, _ = tokenizer_files(tokenizer)
    size = load_tokenizer(tok_file).get_vocab_size(with_added_tokens=True)
    if size > model_vocab_size:
        raise ValueError(f"tokenizer {tok_file} has {size} tokens but the model's vocab_size is {model_vocab_size}; "
                         "token ids past the embedding would be out of range")
    return size
