"""Hugging Face `LlamaForCausalLM` format, both ways: tensor names, config and `AutoTokenizer` files. Reading and
writing directories is aquila.checkpoint's job.

FlagAI rotates adjacent pairs (2j, 2j+1) of each head; HF's `rotate_half` pairs j with j + head_dim/2. So the
rows of wq and wk are permuted per head on the way out and back. Everything else is a rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import processors

from aquila.chat_template import JINJA_CHAT_TEMPLATE
from aquila.config import ModelArgs
from aquila.errors import AquilaError
from aquila.tokenizer import Tokenizer, load_tokenizer

_LAYER_MAP = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def interleaved_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from pairs (2j, 2j+1) to halves (j, j + d/2)."""
    d = w.shape[0] // heads
    return w.view(heads, d // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    d = w.shape[0] // heads
    return w.view(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


def _rename(name: str, to_hf: bool) -> str:
    pairs = [(f"{k}.", f"{v}.") for k, v in _TOP_MAP.items()]
    if to_hf:
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            for ours, theirs in _LAYER_MAP.items():
                if rest.startswith(ours + "."):
                    return f"model.layers.{idx}.{theirs}{rest[len(ours) :]}"
        for ours, theirs in pairs:
            if name.startswith(ours):
                return theirs + name[len(ours) :]
    else:
        if name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            for ours, theirs in _LAYER_MAP.items():
                if rest.startswith(theirs + "."):
                    return f"layers.{idx}.{ours}{rest[len(theirs) :]}"
        for ours, theirs in pairs:
            if name.startswith(theirs):
                return ours + name[len(theirs) :]
    return name  # unknown names pass through and are reported by the strict load


def hf_name(name: str) -> str:
    """The Hugging Face name of a FlagAI tensor name (`layers.0.attention.wq.weight` -> `model.layers.0....`)."""
    return _rename(name, to_hf=True)


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.endswith("attention.wq.weight"):
            tensor = interleaved_to_half(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = interleaved_to_half(tensor, args.kv_heads)
        out[_rename(name, to_hf=True)] = tensor.contiguous()
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # written by old converters, recomputed by every loader
        ours = _rename(name, to_hf=False)
        if ours.endswith("attention.wq.weight"):
            tensor = half_to_interleaved(tensor, args.n_heads)
        elif ours.endswith("attention.wk.weight"):
            tensor = half_to_interleaved(tensor, args.kv_heads)
        out[ours] = tensor.contiguous()
    return out


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """A LlamaConfig dict with the real vocabulary size and Aquila's special ids (FlagAI's converter had neither)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": args.initializer_range,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        # The 8 special ids follow the base vocabulary: [CLS] = BOS is vocab-2, </s> = EOS is vocab-1.
        "bos_token_id": args.vocab_size - 2,
        "eos_token_id": args.vocab_size - 1,
        "pad_token_id": 0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def args_from_hf_config(cfg: dict, source: str) -> ModelArgs:
    if cfg.get("model_type") not in ("llama", "aquila"):
        raise AquilaError(f"{source}: model_type {cfg.get('model_type')!r} is not llama or aquila")
    try:
        dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        args = ModelArgs(
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") if cfg.get("num_key_value_heads") not in (None, heads) else None,
            vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            initializer_range=cfg.get("initializer_range", 0.02),
            rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        )
    except KeyError as e:
        raise AquilaError(f"{source}: missing key {e.args[0]!r}") from None
    # FFN width is derived from multiple_of in FlagAI's config; find the multiple_of that reproduces it.
    ffn = cfg.get("intermediate_size")
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1, ffn):
        candidate = ModelArgs(**{**args.to_dict(), "multiple_of": multiple_of})
        if candidate.ffn_dim == ffn:
            return candidate
    raise AquilaError(f"{source}: intermediate_size {ffn} cannot be expressed as FlagAI's multiple_of rounding")


def write_hf_tokenizer(src: str | os.PathLike, out_dir: Path, args: ModelArgs) -> None:
    """tokenizer.json + tokenizer_config.json for `AutoTokenizer`, from any BPE tokenizer directory (FlagAI's
    vocab.json + merges.txt too): BOS `[CLS]` is prepended as aquila's Predictor does, the length limit is the
    model's, and `chat_template` renders aquila's chat template (`apply_chat_template` gives `encode_prompt`'s ids).
    A sentencepiece tokenizer keeps its own files."""
    tokenizer = load_tokenizer(src)
    if not isinstance(tokenizer, Tokenizer):
        return
    backend = type(tokenizer.backend).from_str(tokenizer.backend.to_str())
    bos = tokenizer.id_to_token(tokenizer.token_start_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_start_id)]
    )
    (out_dir / "tokenizer.json").write_text(backend.to_str() + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": tokenizer.id_to_token(tokenizer.token_end_id),
        "unk_token": tokenizer.id_to_token(tokenizer.token_unk_id),
        "pad_token": tokenizer.id_to_token(tokenizer.token_pad_id),
        "model_max_length": args.max_seq_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": JINJA_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
