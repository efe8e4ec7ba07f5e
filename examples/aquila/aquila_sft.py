"""FlagAI's examples/Aquila/Aquila-chat/aquila_chat.py: a thin wrapper over `aquila sft`.

torchrun --nproc_per_node 2 aquila_sft.py --yaml_config Aquila-sft-tiny.yaml
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # run from a checkout

from aquila.train.sft import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="aquila_sft.py"))
