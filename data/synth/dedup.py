"""Near-duplicate detection: MinHash over word n-gram shingles, LSH banding for candidates, exact Jaccard to confirm.

Shingles are hashed with CRC32 (stable across processes, unlike Python's `hash`). Banding is chosen so that a pair
at the threshold becomes a candidate with probability >= 0.99; every candidate is then confirmed on the exact
Jaccard similarity of the shingle sets, so the result equals a brute-force Jaccard scan up to that 1% recall bound.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import zlib
from collections import defaultdict
from typing import Sequence

import numpy as np

_WORD_RE = re.compile(r"\w+")
_PRIME = (1 << 31) - 1


def shingles(text: str, n: int) -> set[int]:
    """CRC32 hashes of the lower-cased word n-grams of `text` (the whole text if shorter than n words)."""
    words = _WORD_RE.findall(text.lower())
    if len(words) < n:
        return {zlib.crc32(" ".join(words).encode())} if words else set()
    return {zlib.crc32(" ".join(words[i:i + n]).encode()) for i in range(len(words) - n + 1)}


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows): the most selective banding whose candidate probability at `threshold` is >= 0.99."""
    options = [(num_perm // r, r) for r in range(1, num_perm + 1) if num_perm % r == 0]
    good = [(b, r) for b, r in options if 1 - (1 - threshold ** r) ** b >= 0.99]
    return max(good, key=lambda br: br[1]) if good else (num_perm, 1)


def signatures(sets: Sequence[set[int]], num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures `[docs, num_perm]` (uint64) under universal hashes (a*x + b) mod (2^31 - 1)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)
    b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)
    out = np.full((len(sets), num_perm), _PRIME, dtype=np.uint64)
    for i, s in enumerate(sets):
        if s:
            x = np.fromiter(s, dtype=np.uint64, count=len(s)) % _PRIME
            out[i] = ((x[:, None] * a[None, :] + b[None, :]) % _PRIME).min(axis=0)
    return out


@dataclasses.dataclass(frozen=True)
class Duplicate:
    """Document `index` is a near-duplicate of the earlier kept document `of` (Jaccard `similarity`)."""

    index: int
    of: int
    similarity: float


def near_duplicates(texts: Sequence[str], *, threshold: float = 0.8, ngram: int = 5, num_perm: int = 128,
                    seed: int = 0) -> list[Duplicate]:
    """Later documents whose shingle Jaccard with an earlier kept one is >= threshold (first occurrence wins)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    sets = [shingles(t, ngram) for t in texts]
    sig = signatures(sets, num_perm, seed)
    bands, rows = _bands(num_perm, threshold)
    candidates: dict[int, set[int]] = defaultdict(set)
    for band in range(bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, row in enumerate(sig[:, band * rows:(band + 1) * rows]):
            buckets[row.tobytes()].append(i)
        for members in buckets.values():
            for i, j in itertools.combinations(members, 2):
                candidates[j].add(i)
    dropped: dict[int, Duplicate] = {}
    for j in sorted(candidates):
        for i in sorted(candidates[j]):
            if i in dropped:
                continue
            sim = jaccard(sets[i], sets[j])
            if sim >= threshold:
                dropped[j] = Duplicate(j, i, sim)
                break
    return sorted(dropped.values(), key=lambda d: d.index)
