"""Aquila's tokenizers (docs/tokenizer.md).

`base`: FlagAI's tokenizer API as a Protocol and the special tokens; `files`: which files a tokenizer directory
holds and their readers/writers; `fast`: the tiktoken encoder and the checks that it gives the BPE's ids; `bpe`: the
byte-level BPE and `load_tokenizer`; `sp`: sentencepiece models; `train`: `aquila train-tokenizer`. Nothing here
imports upward: base <- files <- bpe, base <- fast <- bpe, base <- sp, bpe <- train.
"""

from aquila.tokenizer.base import (  # noqa: F401
    COMMAND_TOKENS,
    ENDOFTEXT,
    SPECIAL_TOKENS,
    BaseTokenizer,
    bytes_to_unicode,
    encodable_text,
)
from aquila.tokenizer.bpe import Tokenizer, load_tokenizer  # noqa: F401
from aquila.tokenizer.files import (  # noqa: F401 (re-exports, as are the lines above)
    MERGES_HEADER,
    SP_MODEL_FILES,
    TOKENIZER_FILES,
    check_merges,
    copy_tokenizer_files,
    read_merges_txt,
    read_tokenizer_json,
    read_vocab_json,
    tokenizer_file,
)
