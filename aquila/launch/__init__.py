"""Launcher support for `examples/aquila/*.sh`: hostfile parsing and validation, node plans, job stop/follow.

The bash launchers keep FlagAI's names and arguments; everything that needs care (parsing, local-address
detection, port checks, finding exactly one job's processes) lives here and is called as
`python -m aquila.launch <subcommand>`. Nothing here imports torch, so each call takes milliseconds, except the
trigger's check of the training config (`train_check`), which runs the trainer's own checks.
"""

from aquila.launch.hostfile import Node, is_local_address, parse_hostfile

__all__ = ["Node", "is_local_address", "parse_hostfile"]
