"""The floating-point dtypes aquila loads, converts and evaluates in, and their names: one map for every entry point."""

from __future__ import annotations

import torch

from aquila.errors import AquilaError

DTYPES: dict[str, torch.dtype] = {
    **dict.fromkeys(("float32", "fp32"), torch.float32),
    **dict.fromkeys(("float16", "fp16", "half"), torch.float16),
    **dict.fromkeys(("bfloat16", "bf16"), torch.bfloat16),
}


def parse_dtype(value: torch.dtype | str | None, what: str = "torch_dtype") -> torch.dtype | None:
    """A torch dtype from a dtype or any of its names (`torch.float16`, "fp16", "half", ...); None stays None."""
    if value is None or isinstance(value, torch.dtype):
        if value not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise AquilaError(f"{what} {value} is not supported (float32, float16 or bfloat16)")
        return value
    key = str(value).removeprefix("torch.").lower()
    if key not in DTYPES:
        raise AquilaError(f"unknown {what} {value!r}; use one of float32, float16, bfloat16")
    return DTYPES[key]
