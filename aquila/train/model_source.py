"""Where a training run's model comes from: one rule for the trainer and the launcher's pre-check.

FlagAI's order: `pre_load_dir/model_name/config.json` if it exists (its weights too when `bmt_pre_load`),
otherwise a preset named `model_name`. Torch-free, so the launcher can call it before starting anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from aquila.config import PRESETS
from aquila.constants import CONFIG_NAME, WEIGHT_NAMES
from aquila.errors import AquilaError


@dataclass(frozen=True)
class ModelSource:
    model_name: str
    model_dir: Path | None  # pre_load_dir/model_name when it holds config.json; None for a preset
    weights: Path | None  # the weights file to load (bmt_pre_load), else None: FlagAI's random init

    def describe(self) -> str:
        if self.model_dir is None:
            return f"preset {self.model_name.lower()}"
        return str(self.weights or self.model_dir / CONFIG_NAME)


def locate_model(model_name: str, pre_load_dir: str | os.PathLike | None, bmt_pre_load: bool) -> ModelSource:
    model_dir = Path(pre_load_dir) / model_name if pre_load_dir else None
    if model_dir is not None and (model_dir / CONFIG_NAME).is_file():
        if not bmt_pre_load:
            return ModelSource(model_name, model_dir, None)
        for name in WEIGHT_NAMES:
            if (model_dir / name).is_file():
                return ModelSource(model_name, model_dir, model_dir / name)
        raise AquilaError(f"bmt_pre_load is set but {model_dir} has no weights ({' or '.join(WEIGHT_NAMES)})")
    if bmt_pre_load:
        where = model_dir / CONFIG_NAME if model_dir else "pre_load_dir (not set)"
        raise AquilaError(f"bmt_pre_load is set but {where} does not exist")
    if model_name.lower() in PRESETS:
        return ModelSource(model_name, None, None)
    where = f"no {model_dir / CONFIG_NAME} and " if model_dir else ""
    raise AquilaError(f"model_name {model_name!r}: {where}no preset of that name ({', '.join(sorted(PRESETS))})")
