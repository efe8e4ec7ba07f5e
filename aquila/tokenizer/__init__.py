"""Aquila's tokenizers: byte-level BPE (`bpe`), sentencepiece (`sp`) and BPE training (`train`).

See docs/tokenizer.md.
"""

from aquila.tokenizer.bpe import (
    COMMAND_TOKENS,
    ENDOFTEXT,
    MERGES_HEADER,
    SP_MODEL_FILES,
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    BaseTokenizer,
    Tokenizer,
    bytes_to_unicode,
    check_merges,
    copy_tokenizer_files,
    load_tokenizer,
    read_merges_txt,
    read_tokenizer_json,
    read_vocab_json,
)

__all__ = [
    "COMMAND_TOKENS",
    "ENDOFTEXT",
    "MERGES_HEADER",
    "SP_MODEL_FILES",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILES",
    "BaseTokenizer",
    "Tokenizer",
    "bytes_to_unicode",
    "check_merges",
    "copy_tokenizer_files",
    "load_tokenizer",
    "read_merges_txt",
    "read_tokenizer_json",
    "read_vocab_json",
]
