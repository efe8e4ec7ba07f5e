"""`aquila convert SRC model.gguf --to gguf`: one GGUF file (llama.cpp's format) with the weights, the tokenizer and
the chat template, written with the `gguf` package (llama.cpp's own writer and quantizers).

Architecture "llama". llama.cpp's llama rotary rotates adjacent pairs (2j, 2j+1), Meta's original layout, which is
FlagAI's: q/k rows are written as aquila holds them (llama.cpp's own HF converter un-permutes HF's rotate-half rows
back to this layout). Tensor names come from gguf's own HF -> GGUF map (through aquila.hf's names).

Tokenizer: byte-level BPE as llama.cpp's "gpt2" model with the "gpt-2" pre-tokenizer (GPT-2's regex, which is ours:
no normalizer, no prefix space; llama.cpp's `llama_detokenize` also removes a space before `?!.,` for it, as HF's
clean_up_tokenization_spaces did, while generated text, piece by piece, is not touched); the 8 specials and `<|endoftext|>` are control tokens; BOS `[CLS]` is added to
prompts (as aquila's Predictor does), EOS `</s>`, unk/pad `<|endoftext|>` (which llama.cpp also treats as an
end-of-generation token, as aquila stops at id 0). A model vocabulary larger than the tokenizer's is padded with
unused `[PAD<id>]` tokens.

Out types: f32; f16 (matrices f16, norms f32); q8_0 / q4_0 (matrices quantized by gguf.quants, blocks of 32 along
each row; a matrix whose rows are not a multiple of 32 falls back to f16, as llama.cpp's converter does). The file
is written tensor by tensor under a temporary name, then renamed: the header from the tensors' shapes, then each
tensor read from the source, converted and written before the next is read (a 29 GB fp32 7B model converts in a
few GB).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from aquila.chat_template import JINJA_CHAT_TEMPLATE
from aquila.config import ModelArgs
from aquila.errors import AquilaError
from aquila.hf import hf_name
from aquila.io_utils import atomic_path
from aquila.optional import require
from aquila.tokenizer import Tokenizer, load_tokenizer

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
# llama.cpp's name for GPT-2's split regex (llama-vocab.cpp maps "gpt-2" to LLAMA_VOCAB_PRE_TYPE_GPT2; "gpt2" is
# refused as an unknown pre-tokenizer).
PRE_TOKENIZER = "gpt-2"


def _types(gguf):
    q = gguf.GGMLQuantizationType
    t = gguf.LlamaFileType
    return {
        "f32": (q.F32, t.ALL_F32),
        "f16": (q.F16, t.MOSTLY_F16),
        "q8_0": (q.Q8_0, t.MOSTLY_Q8_0),
        "q4_0": (q.Q4_0, t.MOSTLY_Q4_0),
    }


def tensor_type(gguf, shape: tuple[int, ...], wanted):
    """The GGML type a tensor of `shape` gets: 1-D (norms) stay f32; a matrix gets `wanted`, or f16 when its rows
    do not split into the quantization's blocks."""
    q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return q.F32
    if wanted in (q.F32, q.F16):
        return wanted
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else q.F16


def _encoded(gguf, tensor: torch.Tensor, qtype) -> np.ndarray:
    data = tensor.detach().to(torch.float32).numpy()
    return gguf.quants.quantize(data, qtype)


def tokenizer_vocab(gguf, tokenizer: Tokenizer, vocab_size: int, source: str) -> tuple[list[str], list[int]]:
    """(token strings by id, token types) for `vocab_size` ids."""
    if vocab_size < len(tokenizer):
        raise AquilaError(
            f"{source}: the model's vocab_size {vocab_size} is smaller than its tokenizer ({len(tokenizer)} tokens)"
        )
    tokens = [""] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for token, id_ in tokenizer.vocab.items():
        tokens[id_] = token
    for token, id_ in tokenizer.special_ids.items():
        tokens[id_] = token
        types[id_] = int(gguf.TokenType.CONTROL)
    for id_ in range(len(tokenizer), vocab_size):
        tokens[id_] = f"[PAD{id_}]"
        types[id_] = int(gguf.TokenType.UNUSED)
    return tokens, types


def _add_tokenizer(writer, gguf, tokenizer: Tokenizer, vocab_size: int, source: str) -> None:
    tokens, types = tokenizer_vocab(gguf, tokenizer, vocab_size, source)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in tokenizer.merges])
    writer.add_bos_token_id(tokenizer.token_start_id)
    writer.add_eos_token_id(tokenizer.token_end_id)
    writer.add_unk_token_id(tokenizer.token_unk_id)
    writer.add_pad_token_id(tokenizer.token_pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(JINJA_CHAT_TEMPLATE)


def _add_hparams(writer, args: ModelArgs, name: str, file_type: int) -> None:
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_vocab_size(args.vocab_size)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(float(args.rope_theta))
    if args.head_dim * args.n_heads != args.dim:
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)


def write_gguf(
    path: str | os.PathLike,
    args: ModelArgs,
    shapes: Mapping[str, torch.Tensor],
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer_dir: str | os.PathLike,
    outtype: str = "f32",
    name: str = "aquila",
) -> None:
    """Write the weights and the tokenizer of `tokenizer_dir` as one GGUF file. `shapes` (FlagAI names, checked
    against `args`; tensors or meta tensors) fixes the header; `tensors` then yields the same names in the same
    order, each encoded and written before the next is read, so only one tensor is held at a time."""
    gguf = require("gguf", "aquila convert --to gguf")
    if outtype not in OUTTYPES:
        raise AquilaError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    tokenizer = load_tokenizer(tokenizer_dir)
    if not isinstance(tokenizer, Tokenizer):
        raise AquilaError(f"{tokenizer_dir}: GGUF export supports byte-level BPE tokenizers only, not sentencepiece")
    wanted, file_type = _types(gguf)[outtype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, args.n_layers)

    plan = []  # (FlagAI name, gguf name, shape, ggml type), in the order of `shapes`
    fallback = []
    for key, tensor in shapes.items():
        gguf_name = names.get_name(hf_name(key), try_suffixes=(".weight",))
        if gguf_name is None:
            raise AquilaError(f"{key}: no GGUF name for this tensor (llama architecture)")
        qtype = tensor_type(gguf, tuple(tensor.shape), wanted)
        if qtype != wanted and tensor.dim() > 1:
            fallback.append(gguf_name)
        plan.append((key, gguf_name, tuple(tensor.shape), qtype))
    if fallback:
        print(
            f"{outtype}: rows not a multiple of the block size, written as f16: {', '.join(fallback)}", file=sys.stderr
        )

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        try:
            _add_hparams(writer, args, name, file_type)
            _add_tokenizer(writer, gguf, tokenizer, args.vocab_size, str(tokenizer_dir))
            for _, gguf_name, shape, qtype in plan:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                nbytes = int(np.prod(byte_shape))
                if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
                    writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), nbytes)
                else:
                    writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            stream = iter(tensors)
            for key, _, shape, qtype in plan:  # one read and converted tensor at a time
                got, tensor = next(stream, (None, None))
                if got != key or tuple(tensor.shape) != shape:
                    raise AquilaError(f"{key}: the weights stream gave {got!r} here (expected {key} {list(shape)})")
                writer.write_tensor_data(_encoded(gguf, tensor, qtype))
                del tensor
        finally:
            writer.close()


def gguf_destination(dst: Path) -> None:
    """DST names a file: refuse an existing directory (a model directory is not replaced by one file)."""
    if dst.is_dir():
        raise AquilaError(f"{dst} is a directory; --to gguf writes one file (e.g. {dst / 'model.gguf'})")
