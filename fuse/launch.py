"""How a training job starts on several nodes of one SLURM allocation: one `accelerate launch` per node through
srun. Worker code (fuse.training) needs it; it knows nothing else about the scheduler.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping

# Our own placeholders ($SLURM_NODEID, "--dependency=afterok:$prepare"): variables among plain option characters.
# No "/", quote, space, backtick or parenthesis, so a path (a workdir with "$(...)" in it) is never expanded.
EXPANDABLE = re.compile(r"(--[\w-]+=)?[\w:,.-]*\$[A-Za-z_][\w:,.$-]*")


def multinode_command(command: list[str], nodes: int) -> list[str]:
    """One `accelerate launch` on each of `nodes` nodes of this SLURM allocation, through srun, from a single-node one
    (`python -m accelerate.commands.launch [options] -m module args`). The rendezvous comes from the variables
    the job script exports (MASTER_ADDR, MASTER_PORT, FUSE_NUM_MACHINES) and each node's SLURM_NODEID.
    The rendezvous is static: node i's ranks are i*P .. i*P+P-1, so global rank 0, the one writer of a training's
    outputs, runs on the first node beside the job script (a c10d rendezvous numbers the nodes as they arrive).
    DeepSpeed starts through the same per-node launcher ("standard"), not its own pdsh runner.
    For one node the command is returned unchanged."""
    if nodes <= 1:
        return list(command)
    try:
        at = command.index("accelerate.commands.launch") + 1
    except ValueError:
        raise ValueError(f"not an `accelerate launch` command: {shlex.join(command)}") from None
    head, rest = list(command[:at]), list(command[at:])
    per_node = int(_pop_option(rest, "--num_processes") or 1)
    for name in (  # ours to set, per node
        "--num_machines",
        "--machine_rank",
        "--main_process_ip",
        "--main_process_port",
        "--rdzv_backend",
    ):
        _pop_option(rest, name)
    launch = [  # one option and its value a line
        "--num_machines", str(nodes),
        "--num_processes", str(nodes * per_node),
        "--machine_rank", "$SLURM_NODEID",
        "--main_process_ip", "$MASTER_ADDR",
        "--main_process_port", "$MASTER_PORT",
        "--rdzv_backend", "static",
        "--same_network",
    ]  # fmt: skip
    if "--use_deepspeed" in rest:
        # accelerate's default for DeepSpeed on several machines is DeepSpeed's pdsh runner, started on one node
        _pop_option(rest, "--deepspeed_multinode_launcher")
        launch += ["--deepspeed_multinode_launcher", "standard"]
    inner = " ".join(shell_word(a) for a in [*head, *launch, *rest])
    return [
        "srun",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "bash",
        "-c",
        f"exec {inner}",
    ]


def allocated_nodes(environ: Mapping[str, str] | None = None) -> int:
    """The nodes of the SLURM allocation this process runs in (1 outside SLURM): what the job script exports for a
    multi-node training (FUSE_NUM_MACHINES), else SLURM's own count."""
    env = os.environ if environ is None else environ
    return int(env.get("FUSE_NUM_MACHINES") or env.get("SLURM_NNODES") or 1)


def shell_word(arg: str) -> str:
    """Quote for bash, but let our "$VARIABLES" expand (they are evaluated where the command runs)."""
    return f'"{arg}"' if EXPANDABLE.fullmatch(arg) else shlex.quote(arg)


def _pop_option(args: list[str], name: str) -> str | None:
    """Remove `name value` (or `name=value`) from the launcher's options, before its `-m`; return the value."""
    end = args.index("-m") if "-m" in args else len(args)
    for i, arg in enumerate(args[:end]):
        if arg == name and i + 1 < end:
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if arg.startswith(name + "="):
            del args[i]
            return arg.split("=", 1)[1]
    return None
