"""Load the newest checkpoint of a run with AutoLoader and print a few continuations (the model card's snippet).

usage: python generate_demo.py checkpoints_out/<exp>/<version>/
"""

import json
import sys
from pathlib import Path

import torch

from aquila import AutoLoader, Predictor

PROMPTS = ["北京是中国的", "人民日报记者", "The government said", "def main():"]


def loss_curve(run_dir: Path) -> tuple[float, float] | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    losses = [
        r["loss"]
        for r in map(json.loads, path.read_text().splitlines())
        if "loss" in r and r.get("split", "train") == "train"
    ]
    return (losses[0], losses[-1]) if losses else None


def main(run_dir: str) -> None:
    run = Path(run_dir)
    step = (run / "latest_iteration.txt").read_text().split()[0]
    loader = AutoLoader("lm", model_dir=str(run), model_name=step, use_cache=True)
    model = loader.get_model()
    tokenizer = loader.get_tokenizer()
    model.eval()
    predictor = Predictor(model, tokenizer)
    curve = loss_curve(run)
    if curve:
        print(f"loss: first logged {curve[0]:.3f} -> last logged {curve[1]:.3f}")
    print(f"checkpoint: {run / step}")
    with torch.no_grad():
        for text in PROMPTS:
            # A model this small and this briefly trained repeats its most frequent token under plain greedy
            # decoding, so the greedy line uses a repetition penalty (FlagAI's argument, applied here).
            greedy = predictor.predict_generate_randomsample(
                text, out_max_length=40, temperature=0, repetition_penalty=1.3
            )
            sampled = predictor.predict_generate_randomsample(
                text, out_max_length=40, temperature=0.8, top_p=0.95, seed=0
            )
            print(f"\nprompt : {text}")
            print(f"greedy (repetition_penalty 1.3): {greedy!r}")
            print(f"sampled (temperature 0.8, top_p 0.95): {sampled!r}")


if __name__ == "__main__":
    main(sys.argv[1])
