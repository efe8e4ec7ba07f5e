"""Model shape: `ModelArgs` with FlagAI's field names, named presets, and FlagAI's config.json."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

from aquila.constants import IGNORE_INDEX
from aquila.errors import AquilaError
from aquila.io_utils import read_json, write_text_atomic
from aquila.typed_config import from_dict

# Keys FlagAI's AQUILAConfig knows that configure its runtime, not the weights' shape. They are accepted in
# config.json (released checkpoints carry some) and not stored. Each maps to the value that behaves like ours
# (None: any value does) and why; any other value prints one warning line naming why it has no effect.
_ANY = None
FLAGAI_RUNTIME_KEYS: dict[str, tuple[object, str]] = {
    "flash_atten": (_ANY, "flash-attn is used on CUDA whenever it is installed"),
    "flash_atten_llama_style": (_ANY, "flash-attn is used on CUDA whenever it is installed"),
    "flash_atten_pdrop": (0.0, "attention dropout is not implemented"),
    "checkpoint_activations": (False, "set checkpoint_activations: True in the training YAML instead"),
    "use_cache": (_ANY, "generation always uses the static KV cache"),
    "max_batch_size": (_ANY, "the KV cache is sized at generation time (aquila serve: --max-batch)"),
    "bmt_comm_overlap": (False, "BMTrain's communication settings are its defaults"),
    "bmt_fused_ce": (_ANY, "the loss is always the chunked fused linear + cross-entropy"),
    "bmt_fused_ce_inplace": (_ANY, "the loss is always the chunked fused linear + cross-entropy"),
    "fix_large_bsz": (_ANY, "batch size does not change the attention path here"),
    "ignore_index": (IGNORE_INDEX, f"labels to ignore are always {IGNORE_INDEX}"),
}


def _runtime_key_warnings(data: dict, source: str) -> None:
    for key, (same, why) in FLAGAI_RUNTIME_KEYS.items():
        if key in data and same is not _ANY and data[key] != same:
            print(f"warning: {source}: {key}: {data[key]} has no effect: {why}", file=sys.stderr)


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (Aquila-7B has no GQA)
    vocab_size: int = 100008
    multiple_of: int = 256
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    initializer_range: float = 0.006
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise AquilaError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise AquilaError(f"model config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise AquilaError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise AquilaError(f"model config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        # FlagAI/Meta: int(2 * 4 * dim / 3) rounded up to multiple_of (11008 for dim 4096).
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        d, f, v, hd = self.dim, self.ffn_dim, self.vocab_size, self.head_dim
        attn = d * d * 2 + 2 * d * self.kv_heads * hd
        per_layer = attn + 3 * d * f + 2 * d
        return self.n_layers * per_layer + 2 * v * d + d

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["n_kv_heads"] is None:
            del out["n_kv_heads"]
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> ModelArgs:
        if isinstance(data, dict) and data.get("flash_atten_aquila_style"):
            raise AquilaError(
                f"{source}: flash_atten_aquila_style checkpoints use fused Wqkv keys, which are not supported"
            )
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "flash_atten_aquila_style"}
            _runtime_key_warnings(data, source)
        return from_dict(cls, data, source, ignore=frozenset(FLAGAI_RUNTIME_KEYS))

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelArgs:
        key = name.lower()
        if key not in PRESETS:
            raise AquilaError(f"unknown model name {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[key], **overrides)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelArgs:
        """Read FlagAI's config.json (or params.json)."""
        return cls.from_dict(read_json(path), str(path))

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


_7B = ModelArgs()
PRESETS: dict[str, ModelArgs] = {
    "aquila-7b": _7B,
    "aquilachat-7b": _7B,
    "aquilacode-7b-nv": _7B,
    "aquilacode-7b-ts": _7B,
    "aquila-33b": ModelArgs(dim=6656, n_layers=60, n_heads=52, norm_eps=1e-5),
    "aquilachat-33b": ModelArgs(dim=6656, n_layers=60, n_heads=52, norm_eps=1e-5),
    # ~1.1B for GPU checks.
    "aquila-1b": ModelArgs(dim=2048, n_layers=16, n_heads=16),
    # Demo and test sizes: vocab 16,008 = the demo tokenizer's 16,000 entries + 8 specials.
    "aquila-tiny": ModelArgs(
        dim=256, n_layers=4, n_heads=8, vocab_size=16008, multiple_of=32, max_seq_len=512, initializer_range=0.02
    ),
    "aquila-micro": ModelArgs(
        dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=16, max_seq_len=128, initializer_range=0.02
    ),
}
