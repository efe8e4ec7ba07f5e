"""`python -m aquila.launch <subcommand>`: the launchers' Python half. Plans are printed as shell assignments
(values quoted with shlex) for the bash scripts to `eval`; errors are one line `error: ...`, exit status 2."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from aquila.errors import AquilaError, run_command
from aquila.io_utils import read_yaml
from aquila.launch import hostfile as hf
from aquila.launch import interfaces, jobs, ports, train_check


def _emit(**values) -> None:
    for key, value in values.items():
        if isinstance(value, list | tuple):
            print(f"{key}=({' '.join(shlex.quote(str(v)) for v in value)})")
        else:
            print(f"{key}={shlex.quote(str(value))}")


def _check_inputs(args, warn: bool = True) -> tuple[list[hf.Node], Path]:
    """Everything both plans validate: hostfile, YAML, model, experiment name, training script (the costly check
    of the training config itself, `_check_training`, comes after the cheap ones)."""
    hf.check_name("experiment name", args.exp)
    nodes = hf.parse_hostfile(args.hostfile)
    data = read_yaml(args.config)
    # The YAML wins over the launcher's flags (FlagAI's precedence): say so (once) when it overrides them.
    for key, ours in (("model_name", args.model), ("experiment_name", args.exp)):
        if warn and key in data and str(data[key]) != ours:
            print(f"warning: {args.config} sets {key}: {data[key]}, which overrides {ours!r}", file=sys.stderr)
    for key in ("save_dir", "pre_load_dir", "wandb_dir"):
        if warn and data.get(key) is not None:
            print(f"warning: {args.config} sets {key}: {data[key]}, which overrides the launcher's", file=sys.stderr)
    hf.check_model(str(data.get("model_name") or args.model), args.proj_home, data)
    return nodes, hf.choose_script(args.config, data, args.script_dir)


def _train_args(args) -> list[str]:
    return train_check.trainer_args(args.proj_home, args.exp, args.version, args.model, args.config)


def _check_training(args, script: Path) -> None:
    """The trainer's own parser and pre-start checks on the argv its processes will get (see train_check)."""
    train_check.check_training_inputs(script, args.script_dir, _train_args(args))


def cmd_trigger_plan(args) -> int:
    nodes, script = _check_inputs(args)
    local = [hf.is_local_address(n.address) for n in nodes]
    master = nodes[0]
    port = hf.master_port()
    if args.single_node:
        if len(nodes) != 1:
            raise AquilaError(
                f"hostfile {args.hostfile}: local_trigger_docker.sh needs exactly 1 node, found {len(nodes)} "
                f"(use dist_trigger_docker.sh)"
            )
        if not local[0]:
            raise AquilaError(
                f"hostfile {args.hostfile} line {master.line}: {master.address} is not this machine "
                f"(use 127.0.0.1, or dist_trigger_docker.sh)"
            )
    if not all(local) and hf.is_loopback_name(master.address):
        raise AquilaError(
            f"hostfile {args.hostfile} line {master.line}: master {master.address} is a loopback address but "
            f"other nodes are remote; put the master's network address first"
        )
    if not local[0] and not hf.resolves(master.address):
        raise AquilaError(
            f"hostfile {args.hostfile} line {master.line}: master {master.address!r} does not resolve; use an IP "
            f"address or a name every node can resolve (ssh aliases are not enough)"
        )
    if local[0]:
        hf.check_port_free(master.address, port)  # early, for a quick answer; claim-port checks it again
    for node, is_local in zip(nodes, local):
        if is_local:  # remote nodes are checked there, over ssh, before anything starts (check-node)
            interfaces.node_interface(args.hostfile, node, multi_host=not all(local))
    _check_training(args, script)
    _emit(
        NODES_NUM=len(nodes),
        NODE_ADDRS=[n.address for n in nodes],
        NODE_SLOTS=[n.slots for n in nodes],
        NODE_LOCAL=[int(x) for x in local],
        MASTER_ADDR=master.address,
        MASTER_PORT=port,
        SCRIPT_FILE=script,
        PORT_LOCK=ports.lock_path(port) if local[0] else "",
    )
    return 0


def cmd_claim_port(args) -> int:
    ports.claim(args.fd, args.address, args.port, args.job_id)
    return 0


def cmd_check_names(args) -> int:
    hf.check_name("experiment name", args.exp)
    if args.version is not None:
        hf.check_name("experiment version", args.version)
    return 0


def cmd_node_plan(args) -> int:
    # dist_trigger_docker.sh has checked the same inputs and printed their warnings; a node started by hand has not.
    checked = os.environ.get("AQUILA_TRIGGER_CHECKED") == "1"
    nodes, script = _check_inputs(args, warn=not checked)
    if args.rank is None:
        mine = [n for n in nodes if hf.is_local_address(n.address)]
        if len(mine) != 1:
            what = "none" if not mine else "lines " + ", ".join(str(n.line) for n in mine)
            raise AquilaError(
                f"hostfile {args.hostfile}: cannot tell which node this is ({what} match this machine); "
                f"pass the node rank as the 6th argument"
            )
        node = mine[0]
    else:
        if not args.rank.isdigit() or int(args.rank) >= len(nodes):
            raise AquilaError(f"node rank {args.rank!r} must be an integer from 0 to {len(nodes) - 1}")
        node = nodes[int(args.rank)]
    port = hf.master_port()
    if node.rank == 0 and args.check_port:
        hf.check_port_free(node.address, port)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    ifname = _interface(args.hostfile, nodes, node)
    if not checked:
        _check_training(args, script)
    jobs.record_node(args.save_dir, node.rank, args.pid, args.job_id)
    _emit(
        NODES_NUM=len(nodes),
        NODE_RANK=node.rank,
        NPROC_PER_NODE=node.slots,
        MASTER_ADDR=nodes[0].address,
        MASTER_PORT=port,
        SCRIPT_FILE=script,
        TRAIN_ARGS=_train_args(args),
        DEFAULT_OMP_THREADS=max(1, cpus // node.slots),
        SOCKET_IFNAME=ifname,
    )
    return 0


def _interface(hostfile: str, nodes: list[hf.Node], node: hf.Node) -> str:
    return interfaces.node_interface(hostfile, node, multi_host=not all(hf.is_local_address(n.address) for n in nodes))


def cmd_check_node(args) -> int:
    nodes = hf.parse_hostfile(args.hostfile)
    if not 0 <= args.rank < len(nodes):
        raise AquilaError(f"hostfile {args.hostfile}: no node {args.rank}")
    _interface(args.hostfile, nodes, nodes[args.rank])
    return 0


def cmd_hosts(args) -> int:
    nodes = hf.parse_hostfile(args.hostfile)
    _emit(NODE_ADDRS=[n.address for n in nodes], NODE_LOCAL=[int(hf.is_local_address(n.address)) for n in nodes])
    return 0


def cmd_start_job(args) -> int:
    fields = dict(f.split("=", 1) for f in args.field)
    jobs.start_job(args.save_dir, args.proj_home, args.job_id, fields)
    return 0


def _save_dir(args) -> Path:
    if args.version is not None and args.exp is None:
        raise AquilaError("an experiment version needs an experiment name")
    if args.exp is not None:
        cmd_check_names(args)
    return jobs.find_save_dir(args.proj_home, args.exp, args.version)


def cmd_job(args) -> int:
    save_dir = _save_dir(args)
    _emit(JOB_ID=jobs.job_id_for(save_dir), SAVE_DIR=save_dir)
    return 0


def cmd_stop(args) -> int:
    job_id = args.job_id
    if job_id is None:
        job_id = jobs.job_id_for(_save_dir(args))
    import socket

    stopped, killed = jobs.stop_job(job_id, timeout=args.timeout)
    where = socket.gethostname()
    if stopped:
        print(f"{where}: stopped job {job_id} ({len(stopped)} processes: {' '.join(map(str, stopped))})")
        if killed:
            print(f"{where}: {len(killed)} of them outlived SIGTERM by {args.timeout:g} s and were killed (SIGKILL)")
        summary = jobs.stop_summary(args.proj_home, job_id)
        if summary:
            print(f"{where}: {summary}")
    else:
        print(f"{where}: no running process of job {job_id}")
    return 0


def cmd_follow(args) -> int:
    return jobs.follow(args.save_dir, args.log, start_timeout=args.start_timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aquila.launch", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def inputs(sp: argparse.ArgumentParser) -> None:
        for name in ("--hostfile", "--config", "--model", "--exp", "--version", "--proj-home", "--script-dir"):
            sp.add_argument(name, required=True)

    sp = sub.add_parser("trigger-plan", help="validate a launch and print the node list")
    inputs(sp)
    sp.add_argument("--single-node", action="store_true")
    sp.set_defaults(func=cmd_trigger_plan)

    sp = sub.add_parser("node-plan", help="validate, record this node's pid and print its torchrun settings")
    inputs(sp)
    for name in ("--save-dir", "--job-id"):
        sp.add_argument(name, required=True)
    sp.add_argument("--pid", type=int, required=True)
    sp.add_argument("--rank")
    sp.add_argument("--check-port", action="store_true")
    sp.set_defaults(func=cmd_node_plan)

    sp = sub.add_parser("claim-port", help="lock the master port's file (open as --fd) for a job, check the port")
    sp.add_argument("--fd", type=int, required=True)
    for name in ("--address", "--job-id"):
        sp.add_argument(name, required=True)
    sp.add_argument("--port", type=int, required=True)
    sp.set_defaults(func=cmd_claim_port)

    sp = sub.add_parser("check-names", help="check an experiment name (and version) before directories are made")
    sp.add_argument("--exp", required=True)
    sp.add_argument("--version")
    sp.set_defaults(func=cmd_check_names)

    sp = sub.add_parser("hosts", help="print a hostfile's addresses and which are this machine")
    sp.add_argument("--hostfile", required=True)
    sp.set_defaults(func=cmd_hosts)

    sp = sub.add_parser("check-node", help="check that this machine holds node <rank>'s hostfile address")
    sp.add_argument("--hostfile", required=True)
    sp.add_argument("--rank", type=int, required=True)
    sp.set_defaults(func=cmd_check_node)

    sp = sub.add_parser("start-job", help="record a new job in its save dir")
    for name in ("--save-dir", "--proj-home", "--job-id"):
        sp.add_argument(name, required=True)
    sp.add_argument("--field", action="append", default=[])
    sp.set_defaults(func=cmd_start_job)

    for name, func, help_ in (
        ("job", cmd_job, "print JOB_ID and SAVE_DIR of the latest job or of an experiment"),
        ("stop", cmd_stop, "stop one job's processes on this machine"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--proj-home", default=".")
        sp.add_argument("--exp")
        sp.add_argument("--version")
        if name == "stop":
            sp.add_argument("--job-id")
            sp.add_argument("--timeout", type=float, default=float(os.environ.get("AQUILA_STOP_TIMEOUT", "15")))
        sp.set_defaults(func=func)

    sp = sub.add_parser("follow", help="stream a job's log until it ends; exit with its status")
    sp.add_argument("--save-dir", required=True)
    sp.add_argument("--log", required=True)
    sp.add_argument("--start-timeout", type=float, default=float(os.environ.get("AQUILA_START_TIMEOUT", "300")))
    sp.set_defaults(func=cmd_follow)

    args = p.parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
