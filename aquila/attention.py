"""One dispatch point for attention: flash-attn on CUDA when installed, torch SDPA elsewhere."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # optional extra: pip install aquila[gpu]
    except Exception:
        return None
    return flash_attn_func


def flash_available(device: torch.device) -> bool:
    return device.type == "cuda" and _flash_attn_func() is not None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """q: [b, hq, s, d]; k, v: [b, hkv, L, d]; mask: bool [b, 1, s, L] (True = attend) or None.

    `causal` (only with mask None) means the usual lower-triangular mask with s == L.

    Returns [b, s, hq, d]. Grouped-query heads are handled without copying k/v.
    """
    if causal and mask is None and q.dtype in (torch.float16, torch.bfloat16) and flash_available(q.device):
        out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa)
    return out.transpose(1, 2)
