"""Shared names have one home: aquila/constants.py (torch-free) and aquila/dtypes.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from aquila.dtypes import parse_dtype
from aquila.errors import AquilaError

PACKAGE = Path(__file__).resolve().parents[1] / "aquila"
HOMES = {"constants.py": ("IGNORE_INDEX", "CONFIG_NAME", "SAFETENSORS_NAME", "BIN_NAME", "WEIGHT_NAMES"),
         "dtypes.py": ("DTYPES",)}  # fmt: skip


def test_each_shared_constant_is_defined_once():
    names = [n for group in HOMES.values() for n in group]
    definition = re.compile(rf"^\s*(?:_?)({'|'.join(names)})\s*(?::[^=]*)?=", re.M)
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in definition.findall(path.read_text(encoding="utf-8")):
            found.setdefault(name, []).append(path.relative_to(PACKAGE).as_posix())
    assert found == {n: [home] for home, group in HOMES.items() for n in group}


def test_no_ignore_index_literal_in_code():
    """-100 as a label value is IGNORE_INDEX by name everywhere (comments and docstrings may say -100)."""
    code = re.compile(r"[=!]=\s*-100\b|=\s*-100\s*$|\(-100\b", re.M)
    hits = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if code.search(p.read_text("utf-8"))]
    assert hits == ["constants.py"]


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), ("half", torch.float16), ("torch.bfloat16", torch.bfloat16), ("float32", torch.float32)])  # fmt: skip
def test_dtype_names(name, dtype):
    assert parse_dtype(name) is dtype


def test_unknown_dtype_is_one_line():
    with pytest.raises(AquilaError, match="unknown torch_dtype 'int4'; use one of float32, float16, bfloat16"):
        parse_dtype("int4")
