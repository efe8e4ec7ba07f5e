"""FlagAI-era path of `aquila.lora` (the LoRA transform, adapter files and merge), kept for the trainer's imports and
`python -m aquila.train.lora BASE_MODEL_DIR ADAPTER_DIR OUT_DIR`."""

import sys

from aquila.lora import *  # noqa: F403
from aquila.lora import main

if __name__ == "__main__":
    sys.exit(main())
