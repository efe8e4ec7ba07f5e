"""The main job's pieces (examples/aquila/run_demo.sh): decoded text without special tokens, the demo data."""

from __future__ import annotations

from pathlib import Path

from aquila.inference.predictor import TextAssembler
from aquila.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = ROOT / "examples" / "aquila" / "demo_tokenizer"


def test_generated_text_never_shows_special_tokens():
    tok = Tokenizer.from_pretrained(DEMO_TOKENIZER)
    # A briefly trained model emits BOS mid-text: in packed pretraining rows [CLS] follows every </s>.
    ids = [*tok.encode("北京是中国的"), tok.token_start_id, *tok.encode(" capital")]
    asm = TextAssembler(tok)
    text = "".join(asm.push([i]) for i in ids) + asm.finish()
    assert text == "北京是中国的 capital"
