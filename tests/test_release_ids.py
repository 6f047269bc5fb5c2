"""The release's fast integer joins give exactly what Arrow's string hash table and numpy's stable sort give."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import pipeline.release.build as build
from pipeline.release.build import IdIndex
from pipeline.release.splits import argsort_stable


def reference_codes(values: list[str]) -> tuple[list[str], list[int]]:
    enc = pc.dictionary_encode(pa.array(values))
    return enc.dictionary.to_pylist(), enc.indices.to_pylist()


@pytest.mark.parametrize("kind", ["sha256", "mixed_lengths"])
def test_id_index_matches_arrow_dictionary_encoding(kind):
    rng = np.random.default_rng(3)
    base = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(500)]
    if kind == "mixed_lengths":
        base = [b[: 10 + i % 7] for i, b in enumerate(base)]
    values = [base[i] for i in rng.integers(0, len(base), 3000)]
    ix = IdIndex(pa.array(values))
    ids, codes = reference_codes(values)
    assert ix.ids.to_pylist() == ids and ix.codes.tolist() == codes
    probe = values[:50] + ["not-an-id", base[0][:-1] + "x"]
    expected = [ids.index(v) if v in ids else -1 for v in probe]
    assert ix.lookup(pa.array(probe)).tolist() == expected


def test_id_index_survives_forced_hash_collisions(monkeypatch):
    """If two distinct ids hash alike, the index must notice (it compares the strings) and stay exact."""
    real = build._word_hash

    def colliding(values, width):
        h, fits = real(values, width)
        return np.zeros_like(h), fits  # every id collides with every other

    monkeypatch.setattr(build, "_word_hash", colliding)
    values = [hashlib.sha256(str(i % 40).encode()).hexdigest() for i in range(200)]
    ix = IdIndex(pa.array(values))
    ids, codes = reference_codes(values)
    assert ix.ids.to_pylist() == ids and ix.codes.tolist() == codes
    assert ix.lookup(pa.array([values[7], "0" * 64])).tolist() == [ids.index(values[7]), -1]


@pytest.mark.parametrize("n_distinct", [3, 1000, 10**12])
def test_argsort_stable_equals_numpy_stable(n_distinct):
    keys = np.random.default_rng(n_distinct % 97).integers(0, n_distinct, 5000).astype(np.uint64)
    assert (argsort_stable(keys) == np.argsort(keys, kind="stable")).all()
