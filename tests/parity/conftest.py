"""Fixtures of the parity tests: each family's tiny checkpoint, built once per test module."""

from __future__ import annotations

import pytest
from hf_bases import build_base
from two_way import Base


@pytest.fixture(scope="module")
def base_of(tmp_path_factory):
    """family -> Base (checkpoint, jpeft model, params, ids, base logits), built once each."""
    cache = {}

    def build(family: str) -> Base:
        if family not in cache:
            cache[family] = Base(*build_base(family, tmp_path_factory.mktemp(family)))
        return cache[family]

    return build
