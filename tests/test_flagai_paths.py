"""The model card's inference code, as printed with `flagai` -> `aquila`, runs against a tiny local model."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aquila
from aquila.checkpoint import build_model, save_model_dir
from aquila.config import ModelArgs
from tests.test_inference import DEMO_TOKENIZER, single_thread

CARD = Path("/work/shared/seed/000_df87c4ba71f6abf9.txt")
CARD_COPY = Path(__file__).parent / "data" / "model_card_aquila_7b.txt"
# Large enough for the card's out_max_length=200 after the prompt.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=16008, multiple_of=16, max_seq_len=256)


def card_inference_code() -> str:
    """The card's inference block with flagai -> aquila, minus only `import bminf` and `model.cuda()` (no CUDA)."""
    text = (CARD if CARD.is_file() else CARD_COPY).read_text(encoding="utf-8")
    block = re.search(r"### 推理/Inference\s*```python\n(.*?)```", text, re.S).group(1)
    kept = [line for line in block.splitlines() if line.strip() not in ("import bminf", "model.cuda()")]
    assert len(kept) == len(block.splitlines()) - 2
    return "\n".join(kept).replace("flagai", "aquila")


def test_flagai_import_paths_are_the_one_implementation():
    from aquila.auto_model.auto_loader import AutoLoader
    from aquila.data.tokenizer import Tokenizer
    from aquila.model.predictor.predictor import Predictor

    assert (AutoLoader, Predictor, Tokenizer) == (aquila.AutoLoader, aquila.Predictor, aquila.Tokenizer)


@pytest.mark.slow
def test_model_card_inference_code_runs_and_half_matches_fp32(tmp_path):
    model_dir = tmp_path / "checkpoints_in" / "aquila-7b"
    save_model_dir(build_model(ARGS, seed=0), model_dir, formats=("bin",))  # FlagAI's file
    for f in DEMO_TOKENIZER.iterdir():
        shutil.copy(f, model_dir)
    code = card_inference_code()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("text is 北京在哪儿?\npred is ")
    half_text = proc.stdout.split("pred is ", 1)[1].removesuffix("\n")

    # model.half() on CPU generates what fp32 generates (greedy).
    with single_thread():
        loader = aquila.AutoLoader("lm", model_dir=tmp_path / "checkpoints_in", model_name="aquila-7b")
        predictor = aquila.Predictor(loader.get_model().eval(), loader.get_tokenizer())
        with torch.no_grad():
            fp32_text = predictor.predict_generate_randomsample("北京在哪儿?", out_max_length=200, temperature=0)
    assert len(fp32_text) > 20
    assert half_text == fp32_text
