"""torchrun's worker for the launchers: `python -m aquila.launch.worker <script> <args...>` runs the script as
`python <script> <args...>` would, in this process, with one difference at the end.

The trainer exits 75 (EX_TEMPFAIL) when SIGTERM stopped it after writing a checkpoint: a stop, not a failure.
torchrun reports any non-zero exit as a failed child (a `ChildFailedError` traceback and "FAILED" in the log), so
a clean stop read like a crash. Here exit 75 is recorded in `$AQUILA_STOP_RECORD.local<LOCAL_RANK>` and turned
into 0 for torchrun; bmtrain_mgpu.sh then sees that every local rank stopped this way, says so in the log and
exits 75 itself. Every other outcome (other exit statuses, exceptions, signals) passes through unchanged.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from aquila.io_utils import write_text_atomic

STOPPED_EXIT = 75  # aquila.train.loop.PREEMPTED_EXIT (not imported: that module imports torch)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m aquila.launch.worker <script> [args...]")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = str(Path(script).resolve().parent)  # what `python <script>` puts first on the path
    record = os.environ.get("AQUILA_STOP_RECORD")
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code != STOPPED_EXIT or not record:
            raise
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # the stop is done: a later signal (torchrun's) must not cut
            signal.signal(sig, signal.SIG_IGN)  # the record short (the trainer has restored the default handlers)
        write_text_atomic(f"{record}.local{os.environ.get('LOCAL_RANK', '0')}", f"{STOPPED_EXIT}\n")
        sys.exit(0)


if __name__ == "__main__":
    main()
