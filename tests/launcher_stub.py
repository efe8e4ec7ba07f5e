"""Stand-in training script for the launcher tests: accepts exactly the FlagAI flags bmtrain_mgpu.sh passes,
joins the torchrun job over gloo, all-reduces (rank + 1) and writes `<save_dir>/stub/rank<r>.json`.

Environment knobs: STUB_FAIL_RANK=<r> makes global rank r print an `error:` line and exit with status 3 before
joining; STUB_SLEEP=<s> sleeps s seconds after writing its record (for the stop tests); STUB_LOOP=1 keeps
all-reducing after its record until a peer is lost (for the lost-rank tests). On SIGTERM a rank writes
`stub/term<r>` and exits 143; STUB_IGNORE_TERM=1 makes it ignore SIGTERM instead; STUB_STOP_STEP=<n> makes it
act like the trainer instead (rank 0 logs "stopped by SIGTERM at iteration <n>: checkpoint <save_dir>/<n>; exit
status 75", every rank exits 75)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--not_call_launch", action="store_true", required=True)
    for name in ("batch_size", "epochs", "gradient_accumulation_steps"):
        p.add_argument(f"--{name}", type=int, required=True)
    for name in ("lr", "warm_up", "weight_decay", "adam_beta1", "adam_beta2"):
        p.add_argument(f"--{name}", type=float, required=True)
    for name in ("save_dir", "pre_load_dir", "experiment_name", "model_name", "wandb_dir", "yaml_config"):
        p.add_argument(f"--{name}", required=True)
    args = p.parse_args()

    rank = int(os.environ["RANK"])
    out = Path(args.save_dir) / "stub"
    out.mkdir(parents=True, exist_ok=True)
    if os.environ.get("STUB_FAIL_RANK") == str(rank):
        print(f"stub: rank {rank} about to fail\nerror: stub rank {rank} failing on purpose", file=sys.stderr)
        return 3

    stop_step = os.environ.get("STUB_STOP_STEP")

    def on_term(signum, frame):
        (out / f"term{rank}").write_text("SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as the trainer absorbs later signals (torchrun forwards one)
        if stop_step is None:
            sys.exit(143)
        if rank == 0:
            where = Path(args.save_dir) / stop_step
            print(f" stopped by SIGTERM at iteration {stop_step}: checkpoint {where}; exit status 75", flush=True)
        sys.exit(75)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("STUB_IGNORE_TERM") else on_term)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    record = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "node_rank": int(os.environ["GROUP_RANK"]),
        "sum": t.item(),
        "args": vars(args),
        "job_id": os.environ.get("AQUILA_JOB_ID"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    print(f"stub: rank {rank} of {record['world_size']} sum {record['sum']}", flush=True)
    dist.barrier()
    while os.environ.get("STUB_LOOP"):
        dist.all_reduce(t)
        time.sleep(0.05)
    dist.destroy_process_group()
    time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
