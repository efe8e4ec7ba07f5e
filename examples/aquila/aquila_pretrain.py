"""FlagAI's examples/Aquila/Aquila-pretrain/aquila_pretrain.py: a thin wrapper over `aquila pretrain`.

    torchrun --nproc_per_node 2 aquila_pretrain.py --yaml_config Aquila-pretrain-tiny.yaml
Accepts FlagAI's launcher flags (--not_call_launch, --batch_size, ..., --yaml_config); the YAML wins over flags.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # run from a checkout

from aquila.train.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="aquila_pretrain.py"))
