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


class KVCache(nn.Module):
    """Static cache [rows, kv_heads, max_len + 1, head_dim]; not part of the state dict.

    Each row is one sequence with its own length: a token at position p lives in slot p. Slot `max_len` is scratch
    space where padding tokens of a ragged batch write, never read by a real token."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, heads, max_len + 1, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, first_row: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [b, h, s, d] of rows first_row.. at positions input_pos [b, s]; returns slots [0, kv_len)."""
        b = k.shape[0]
        rows = torch.arange(b, device=k.device)[:, None]
        kc, vc = self.k[first_row : first_row + b], self.v[first_row : first_row + b]
        kc[rows, :, input_pos] = k.transpose(1, 2)
        vc[rows, :, input_pos] = v.transpose(1, 2)
        return kc[:, :, :kv_len], vc[:, :, :kv_len]

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Row dst[i] becomes a copy of row src[i] (slots < length); src and dst may overlap (beam reordering)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


class CacheRows(NamedTuple):
    """Tokens of cache rows first_row..first_row+b-1: ids [b, s] at each row's own positions [b, s].

    A position equal to the cache length marks a padding token (it writes the scratch slot). `kv_len` bounds the
    slots read (default: the largest position + 1)."""

    first_row: int
    ids: torch.Tensor
    positions: torch.Tensor
    kv_len: int | None = None


class _AttendRows(NamedTuple):
    """One group of a cached forward, as the attention layers use it: its span of the flattened tokens."""

    offset: int
    rows: int
    width: int
    first_row: int
    positions: torch.Tensor
    kv_len: int
    mask: torch.Tensor  # bool [rows, 1, width, kv_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, causal: bool, cache_at: list[_AttendRows] | None = None) -> torch.Tensor:
        """x [b, s, dim]. With `cache_at`, x is [1, T, dim]: the tokens of several row groups, flattened; each group
        writes its k/v into its cache rows and attends over them (one matmul per weight for all groups)."""
        b, s, _ = x.shape
        q = apply_rotary(self.wq(x).view(b, s, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(b, s, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        if cache_at is None:
            out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal)
        else:
            out = torch.cat([self._attend_cached(g, q[0], k[0], v[0]) for g in cache_at])
        return self.wo(out.reshape(b, s, -1))

    def _attend_cached(self, g: _AttendRows, q, k, v) -> torch.Tensor:
        """Group g's tokens (q/k/v [T, heads, head_dim]) into its cache rows, attending over them: [rows*width, ...]"""
        span = slice(g.offset, g.offset + g.rows * g.width)

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t[span].view(g.rows, g.width, *t.shape[1:]).transpose(1, 2)

        kc, vc = self.kv_cache.update(g.first_row, g.positions, rows(k), rows(v), g.kv_len)
        return attention(rows(q), kc, vc, g.mask, False).flatten(0, 1)


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

    def forward(self, x, cos, sin, mask=None, causal: bool = True, cache_at: list | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, causal, cache_at)
        return h + self.feed_forward(self.ffn_norm(h))


class AquilaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.cache_batch = 0
        self.cache_len = 0

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

    def setup_caches(
        self, max_batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Allocate the static KV cache once; later calls with the same or smaller sizes keep it."""
        max_seq_len = max_seq_len or self.args.max_seq_len
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.args.max_seq_len}")
        if max_batch_size <= self.cache_batch and max_seq_len <= self.cache_len:
            return
        if dtype is None:  # the activations' dtype: the token embedding's rows (int8 ones come out in their scales')
            emb = self.tok_embeddings
            dtype = next(t.dtype for t in (*emb.parameters(), *emb.buffers()) if t.is_floating_point())
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_batch_size, self.args.kv_heads, max_seq_len, self.args.head_dim, dtype, self.device
            )
        self.cache_batch, self.cache_len = max_batch_size, max_seq_len

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_batch = self.cache_len = 0

    def copy_cache_rows(self, src: list[int] | torch.Tensor, dst: list[int] | torch.Tensor, length: int) -> None:
        """Cache row dst[i] becomes a copy of row src[i] (positions < length), in every layer: sharing a prompt,
        reordering beams, or moving a running sequence into a freed row."""
        src, dst = (torch.as_tensor(x, dtype=torch.long, device=self.device) for x in (src, dst))
        for layer in self.layers:
            layer.attention.kv_cache.copy_rows(src, dst, length)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        first_row: int = 0,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [b, s, dim].

        Without `input_pos`: a plain causal forward from position 0 that leaves the cache alone. With `input_pos`
        [b, s] (each row's own positions): the tokens go into cache rows first_row..first_row+b-1 at those
        positions and attend to the slots at or before their own position (see `CacheRows`).
        """
        b, s = input_ids.shape
        if input_pos is not None:
            return self.rows_hidden_states([CacheRows(first_row, input_ids, input_pos, kv_len)]).view(b, s, -1)
        positions = torch.arange(s, device=input_ids.device).expand(b, s)
        cos, sin = rotary_tables(positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)

    def rows_hidden_states(self, groups: list[CacheRows]) -> torch.Tensor:
        """Final-norm hidden states [T, dim] of several groups of cache rows in one forward (T = their tokens, group
        after group, row after row): running rows decoding one token each beside a prompt chunk of new rows read
        every weight once."""
        if not self.cache_len:
            raise ValueError("input_pos needs a KV cache: call setup_caches() first")
        attend, offset = [], 0
        for g in groups:
            rows, width = g.ids.shape
            if g.first_row + rows > self.cache_batch:
                raise ValueError(
                    f"rows {g.first_row}..{g.first_row + rows - 1} exceed the KV cache's {self.cache_batch}"
                )
            kv_len = g.kv_len or int(g.positions.max()) + 1
            if kv_len > self.cache_len + 1:
                raise ValueError(f"positions up to {kv_len} exceed the KV cache length {self.cache_len}")
            slots = torch.arange(kv_len, device=g.ids.device)
            mask = (slots[None, None, :] <= g.positions[:, :, None]).unsqueeze(1)  # [rows, 1, width, kv_len]
            attend.append(_AttendRows(offset, rows, width, g.first_row, g.positions, kv_len, mask))
            offset += rows * width
        ids = torch.cat([g.ids.reshape(-1) for g in groups])[None]
        positions = torch.cat([g.positions.reshape(-1) for g in groups])[None]
        cos, sin = rotary_tables(positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(ids)
        for layer in self.layers:
            h = layer(h, cos, sin, None, False, attend)
        return self.norm(h)[0]

    def rows_logits(self, groups: list[CacheRows], logits_at: list[int] | torch.Tensor) -> torch.Tensor:
        """fp32 logits [len(logits_at), vocab] of the tokens at these indices of `rows_hidden_states`' order."""
        h = self.rows_hidden_states(groups)
        return self.output(h[torch.as_tensor(logits_at, device=h.device)]).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        first_row: int = 0,
        kv_len: int | None = None,
        logits_at: torch.Tensor | None = None,
        return_logits: bool | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Returns {'logits', 'loss'}.

        With `labels` (same shape as input_ids; -100 = ignored) the loss is the mean next-token cross-entropy
        (logits[:, :-1] against labels[:, 1:]), computed in chunks without materialising the full logits;
        logits are then returned only if `return_logits=True`. Without labels, logits are fp32, for every
        position or (`logits_at`, one index per row) one position per row, shape [b, vocab].
        """
        h = self.hidden_states(input_ids, input_pos, first_row, kv_len)
        if labels is not None:
            shift_h = h[:, :-1].reshape(-1, h.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1)
            loss = fused_linear_cross_entropy(shift_h, self.output.weight, shift_labels)
            logits = self.output(h).float() if return_logits else None
            return {"logits": logits, "loss": loss}
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]
        return {"logits": self.output(h).float(), "loss": None}
