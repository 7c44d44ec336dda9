"""Generation specs: the theme, its content pools, the template axes, framing switches, target length, count, seed.

A spec is a YAML file. `extends: <name or path>` overlays the file on a parent spec (scalars replace the parent's;
`framing`, `axes` and `pools` are merged key by key), so the matched control and the AI-framed variant share the exact axes and
lengths of the base. Bundled specs live in `data/synth/specs/` and are addressed by file stem (`animal_welfare`).
The spec hash is a SHA-256 over the resolved spec (canonical JSON), so it changes exactly when the content does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any, Mapping

import yaml

import storage

SPECS_DIR = pathlib.Path(__file__).resolve().parent / "specs"
AXES = ("institution", "domain", "document_type", "reasoning_approach")
# YAML key of each axis inside `axes:`.
AXIS_KEYS = {"institution": "institutions", "domain": "domains", "document_type": "document_types",
             "reasoning_approach": "reasoning_approaches"}
# Content pools every spec must provide (non-empty lists of strings); see specs/animal_welfare.yaml for their roles.
POOLS = ("key_phrases", "claims", "practices", "outcomes", "metrics", "stakeholders", "subjects")
TOP_KEYS = {"name", "description", "theme", "extends", "target_tokens", "count", "seed", "framing", "axes", "pools"}


class SpecError(ValueError):
    """A spec file is malformed; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A resolved generation spec. `axes[axis]` and `pools[pool]` are tuples of strings."""

    name: str
    description: str
    theme: str
    target_tokens: int
    count: int
    seed: int
    ai_identity: bool
    ai_framing: tuple[str, ...]
    axes: Mapping[str, tuple[str, ...]]
    pools: Mapping[str, tuple[str, ...]]
    source: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """The canonical content of the spec (what the hash covers)."""
        return _canonical(self.name, self.description, self.theme, self.target_tokens, self.count, self.seed,
                          self.ai_identity, self.ai_framing, self.axes, self.pools)

    def with_overrides(self, **kw: Any) -> "Spec":
        """A copy with some scalar fields replaced (target_tokens, count, seed, ai_identity); rehashed."""
        unknown = set(kw) - {"target_tokens", "count", "seed", "ai_identity"}
        if unknown:
            raise SpecError(f"{self.source}: cannot override {sorted(unknown)}")
        fields = {**dataclasses.asdict(self), **kw}
        fields.pop("hash")
        _check_positive(self.source, fields)
        if fields["ai_identity"] and not fields["ai_framing"]:
            raise SpecError(f"{self.source}: ai_identity needs a non-empty framing.ai_framing list")
        return Spec(**fields, hash=_hash(_canonical(*(fields[k] for k in _CANON_ORDER))))


_CANON_ORDER = ("name", "description", "theme", "target_tokens", "count", "seed", "ai_identity", "ai_framing", "axes",
                "pools")


def _canonical(name, description, theme, target_tokens, count, seed, ai_identity, ai_framing, axes, pools) -> dict:
    return {"name": name, "description": description, "theme": theme, "target_tokens": target_tokens,
            "count": count, "seed": seed, "ai_identity": ai_identity, "ai_framing": list(ai_framing),
            "axes": {k: list(v) for k, v in axes.items()}, "pools": {k: list(v) for k, v in pools.items()}}


def _hash(canon: dict) -> str:
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def bundled_specs() -> list[str]:
    """Names of the specs shipped in data/synth/specs (files starting with `_` are shared bases)."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def resolve_path(name_or_path: str | pathlib.Path, relative_to: storage.Path | None = None) -> storage.Path:
    """A bundled name (`animal_welfare`) or a path to a YAML file (local or gs://)."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        path = storage.Path(text)
        if not path.is_absolute() and relative_to is not None and (relative_to / path).exists():
            path = relative_to / path
        if not path.exists():
            raise SpecError(f"spec file not found: {path}")
        return path
    path = storage.Path(SPECS_DIR / f"{text}.yaml")
    if not path.exists():
        raise SpecError(f"unknown spec {text!r}; bundled specs: {bundled_specs()} (or pass a path to a .yaml)")
    return path


def _load_raw(path: pathlib.Path, seen: tuple[pathlib.Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise SpecError(f"{path}: circular `extends` chain {[str(p) for p in seen]}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    if "extends" not in raw:
        return raw
    parent = _load_raw(resolve_path(raw["extends"], path.parent), seen + (path,))
    merged = {**parent, **{k: v for k, v in raw.items() if k != "extends"}}
    for key in ("framing", "axes", "pools"):  # mappings merge key by key; everything else replaces
        if isinstance(raw.get(key), dict) and isinstance(parent.get(key), dict):
            merged[key] = {**parent[key], **raw[key]}
    merged.pop("extends", None)
    return merged


def _strings(source: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise SpecError(f"{source}: `{key}` must be a non-empty list of non-empty strings")
    if len(set(value)) != len(value):
        dupes = sorted({v for v in value if value.count(v) > 1})
        raise SpecError(f"{source}: `{key}` has duplicate entries {dupes}")
    return tuple(value)


def _check_positive(source: str, fields: Mapping[str, Any]) -> None:
    for key in ("target_tokens", "count"):
        if not isinstance(fields[key], int) or isinstance(fields[key], bool) or fields[key] < 1:
            raise SpecError(f"{source}: `{key}` must be a positive integer, got {fields[key]!r}")
    if not isinstance(fields["seed"], int) or isinstance(fields["seed"], bool):
        raise SpecError(f"{source}: `seed` must be an integer, got {fields['seed']!r}")


def load_spec(name_or_path: str | pathlib.Path) -> Spec:
    """Loads, resolves (`extends`) and validates a spec; raises SpecError naming the file and key."""
    path = resolve_path(name_or_path)
    raw = _load_raw(path)
    source = str(path)
    for key in ("name", "theme", "target_tokens", "count", "seed", "axes", "pools"):
        if key not in raw:
            raise SpecError(f"{source}: missing required key `{key}`")
    axes_raw, pools_raw, framing = raw["axes"], raw["pools"], raw.get("framing") or {}
    if not isinstance(axes_raw, dict) or not isinstance(pools_raw, dict) or not isinstance(framing, dict):
        raise SpecError(f"{source}: `axes`, `pools` and `framing` must be mappings")
    extra_axes = set(axes_raw) - set(AXIS_KEYS.values())
    if extra_axes:
        raise SpecError(f"{source}: unknown axes {sorted(extra_axes)}; allowed: {sorted(AXIS_KEYS.values())}")
    axes = {axis: _strings(source, f"axes.{key}", axes_raw.get(key)) for axis, key in AXIS_KEYS.items()}
    extra_pools = set(pools_raw) - set(POOLS)
    if extra_pools:
        raise SpecError(f"{source}: unknown pools {sorted(extra_pools)}; allowed: {list(POOLS)}")
    pools = {pool: _strings(source, f"pools.{pool}", pools_raw.get(pool)) for pool in POOLS}
    unknown_framing = set(framing) - {"ai_identity", "ai_framing"}
    if unknown_framing:
        raise SpecError(f"{source}: unknown framing keys {sorted(unknown_framing)}")
    ai_identity = framing.get("ai_identity", False)
    if not isinstance(ai_identity, bool):
        raise SpecError(f"{source}: `framing.ai_identity` must be true or false, got {ai_identity!r}")
    ai_framing = _strings(source, "framing.ai_framing", framing["ai_framing"]) if framing.get("ai_framing") else ()
    if ai_identity and not ai_framing:
        raise SpecError(f"{source}: `framing.ai_identity: true` needs a non-empty `framing.ai_framing` list")
    fields = {"name": str(raw["name"]), "description": str(raw.get("description", "")), "theme": str(raw["theme"]),
              "target_tokens": raw["target_tokens"], "count": raw["count"], "seed": raw["seed"],
              "ai_identity": ai_identity, "ai_framing": ai_framing, "axes": axes, "pools": pools}
    _check_positive(source, fields)
    return Spec(**fields, source=source, hash=_hash(_canonical(*(fields[k] for k in _CANON_ORDER))))
