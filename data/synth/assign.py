"""Deterministic assignment of template-axis combinations to document indices.

Each axis walks through independent seeded permutations of its values, one block after another, so that item `i`'s
value on an axis depends only on (spec hash, seed, axis, i): every value appears once in each block of len(axis)
items (full coverage as soon as count >= the axis size), axes vary independently, and growing `count` never changes
the items already assigned (a resumed or extended run keeps its ids).
"""
from __future__ import annotations

import hashlib
import random

from data.synth.spec import AXES, Spec


def item_rng(spec: Spec, seed: int, *parts: object) -> random.Random:
    """A private RNG stream for (spec content, seed, parts...), stable across Python versions and processes."""
    key = "\x1f".join([spec.hash, str(seed), *map(str, parts)])
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def item_id(spec: Spec, seed: int, index: int, kind: str = "doc") -> str:
    """The deterministic id of item `index` of a run: `<spec>-<kind>-s<seed>-<index>-<hash8>`."""
    digest = hashlib.sha256(f"{spec.hash}\x1f{seed}\x1f{kind}\x1f{index}".encode()).hexdigest()[:8]
    return f"{spec.name}-{kind}-s{seed}-{index:06d}-{digest}"


def _value(spec: Spec, seed: int, axis: str, index: int) -> str:
    values = spec.axes[axis]
    block, offset = divmod(index, len(values))
    order = list(range(len(values)))
    item_rng(spec, seed, "axis", axis, block).shuffle(order)
    return values[order[offset]]


def assign(spec: Spec, seed: int, index: int) -> dict[str, str]:
    """The axis values of item `index`: {institution, domain, document_type, reasoning_approach}."""
    if index < 0:
        raise ValueError(f"item index must be >= 0, got {index}")
    return {axis: _value(spec, seed, axis, index) for axis in AXES}
