"""The Aquila decoder (LLaMA architecture), single-device.

Parameter names are FlagAI's, so its `pytorch_model.bin` loads as it is. Parallelism, activation
checkpointing, compilation and quantization are applied to this model from outside.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from aquila.attention import attention
from aquila.config import ModelArgs
from aquila.loss import fused_linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the activation dtype (FlagAI and HF agree on this).
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [b, s, 1, head_dim/2] for integer positions [b, s], in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2j, 2j+1) of x [b, s, h, d], as FlagAI/Meta do. The rotation runs in fp32 whatever
    the dtypes of x and of cos/sin (half-precision tables come from callers that cast a block's float inputs, as
    FSDP2's default cast_forward_inputs=True would; the fsdp backend keeps them fp32)."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos, sin = cos.float(), sin.float()  # no copy when already fp32
    if not torch.compiler.is_compiling():
        # Eager: one complex multiply, forward and backward (8x less CPU time in training than the real ops
        # below, whose select/stack backward passes allocate and copy). Inductor has no complex codegen.
        rotated = torch.view_as_complex(xf) * torch.complex(cos, sin)
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class CachedRows(NamedTuple):
    """One group of rows of a cached forward: ids [b, s] at each row's own positions [b, s].

    Each token writes its k/v at `slots` [b, s] (flat indices into the cache's [blocks * block_size] positions) and
    attends to positions [0, own position] of its row, read through the row's block table `tables` [b, n] (block
    ids in position order). `kv_len` bounds the positions read. `aquila.inference.kv_cache.group_inputs` builds
    these from the decoder's block tables."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    tables: torch.Tensor
    kv_len: int


class _AttendRows(NamedTuple):
    """One group of a cached forward, as the attention layers use it: its span of the flattened tokens."""

    offset: int
    rows: int
    width: int
    slots: torch.Tensor  # [rows * width]
    blocks: torch.Tensor  # [rows * used] the rows' blocks holding their first kv_len positions, row after row
    kv_len: int
    mask: torch.Tensor  # bool [rows, 1, width, kv_len]
    first_block: int | None = None  # one row whose blocks are consecutive from this one: read as a view, no gather


def _consecutive_blocks(tables: torch.Tensor, rows: int, kv_len: int, block_size: int) -> int | None:
    """The first block of a single row whose first kv_len positions lie in consecutive blocks (a lone sequence's
    usual layout), else None. Checked once per step, it spares every layer a gather of the row's whole cache."""
    if rows != 1:
        return None
    used = tables[0, : -(-kv_len // block_size)].tolist()
    return used[0] if used == list(range(used[0], used[0] + len(used))) else None


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, causal: bool, cache_at: list[_AttendRows] | None = None, kv=None):
        """x [b, s, dim]. With `cache_at`, x is [1, T, dim]: the tokens of several row groups, flattened; each group
        writes its k/v into this layer's cache `kv` (k, v [positions, kv_heads, head_dim]) and attends through its
        block tables (one matmul per weight for all groups)."""
        b, s, _ = x.shape
        q = apply_rotary(self.wq(x).view(b, s, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(b, s, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        if cache_at is None:
            out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal)
        else:
            kc, vc, block_size = kv
            for g in cache_at:  # every group's k/v is written before any group reads
                span = slice(g.offset, g.offset + g.rows * g.width)
                kc.index_copy_(0, g.slots, k[0, span].to(kc.dtype))
                vc.index_copy_(0, g.slots, v[0, span].to(vc.dtype))
            out = torch.cat([self._attend_cached(g, q[0], kc, vc, block_size) for g in cache_at])
        return self.wo(out.reshape(b, s, -1))

    def _attend_cached(self, g: _AttendRows, q, kc, vc, block_size: int) -> torch.Tensor:
        """Group g's queries (q [T, heads, head_dim]) over its rows' cached positions: [rows * width, heads, d]."""
        span = slice(g.offset, g.offset + g.rows * g.width)
        qr = q[span].view(g.rows, g.width, *q.shape[1:]).transpose(1, 2)

        def gather(c: torch.Tensor) -> torch.Tensor:  # [rows, kv_heads, kv_len, d] through the block tables
            if g.first_block is not None:
                start = g.first_block * block_size
                return c[start : start + g.kv_len][None].transpose(1, 2)
            # the used blocks only, copied whole by index_select (2-3x faster than advanced indexing, which
            # copied 8 rows' blocks at 7.5 GB/s and took a third of a batch-8 int8 decode step on the 1B shape)
            flat = c.view(-1, block_size * c.shape[1] * c.shape[2]).index_select(0, g.blocks)
            return flat.view(g.rows, -1, *c.shape[1:])[:, : g.kv_len].transpose(1, 2)

        return attention(qr, gather(kc), gather(vc), g.mask, False).flatten(0, 1)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask=None, causal: bool = True, cache_at: list | None = None, kv=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, causal, cache_at, kv)
        return h + self.feed_forward(self.ffn_norm(h))


class AquilaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        """Where the model lives (read from the final norm, which quantization and packing leave alone)."""
        return self.norm.weight.device

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """FlagAI's init: every matrix N(0, initializer_range), norms at one."""
        std = self.args.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [b, s, dim] of a plain causal forward from position 0 (no cache)."""
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device).expand(b, s)
        cos, sin = rotary_tables(positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)

    def cached_forward(self, groups: list[CachedRows], cache, logits_at: list[int] | torch.Tensor) -> torch.Tensor:
        """fp32 logits [len(logits_at), vocab] of a forward over several groups of rows through `cache`, which it
        reads and writes: any object with k, v [layers, positions, kv_heads, head_dim] and `block_size`
        (`aquila.inference.kv_cache.BlockPool`). The groups' tokens are flattened (T = their tokens, group after
        group, row after row; `logits_at` indexes that order), so running rows decoding one token each beside a
        prompt chunk of new rows read every weight once; each row attends only to its own positions."""
        attend, offset = [], 0
        for g in groups:
            rows, width = g.ids.shape
            if g.kv_len > g.tables.shape[1] * cache.block_size:
                raise ValueError(f"positions up to {g.kv_len} exceed the rows' block tables")
            slots = torch.arange(g.kv_len, device=g.ids.device)
            mask = (slots[None, None, :] <= g.positions[:, :, None]).unsqueeze(1)  # [rows, 1, width, kv_len]
            first = (
                None
                if torch.compiler.is_compiling()
                else _consecutive_blocks(g.tables, rows, g.kv_len, cache.block_size)
            )
            blocks = g.tables[:, : -(-g.kv_len // cache.block_size)].reshape(-1)  # once a step, not per layer
            attend.append(_AttendRows(offset, rows, width, g.slots.reshape(-1), blocks, g.kv_len, mask, first))
            offset += rows * width
        ids = torch.cat([g.ids.reshape(-1) for g in groups])[None]
        positions = torch.cat([g.positions.reshape(-1) for g in groups])[None]
        if not torch.compiler.is_compiling() and int(positions.max()) >= self.args.max_seq_len:
            raise ValueError(f"positions up to {int(positions.max())} exceed the model's max_seq_len")
        cos, sin = rotary_tables(positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None, False, attend, (cache.k[i], cache.v[i], cache.block_size))
        h = self.norm(h)[0]
        return self.output(h[torch.as_tensor(logits_at, device=h.device)]).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        return_logits: bool | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Returns {'logits', 'loss'}: a plain causal forward from position 0 (training, scoring); decoding with a
        KV cache goes through `cached_forward`.

        With `labels` (same shape as input_ids; -100 = ignored) the loss is the mean next-token cross-entropy
        (logits[:, :-1] against labels[:, 1:]), computed in chunks without materialising the full logits;
        logits are then returned only if `return_logits=True`. Without labels, logits are fp32, for every
        position or (`logits_at`, one index per row) one position per row, shape [b, vocab].
        """
        h = self.hidden_states(input_ids)
        if labels is not None:
            shift_h = h[:, :-1].reshape(-1, h.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1)
            loss = fused_linear_cross_entropy(shift_h, self.output.weight, shift_labels)
            logits = self.output(h).float() if return_logits else None
            return {"logits": logits, "loss": loss}
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]
        return {"logits": self.output(h).float(), "loss": None}
