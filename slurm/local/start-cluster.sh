#!/usr/bin/env bash
# Start a private SLURM (slurmctld, one or more slurmd, munge) on this host for tests and demos.
#
#   eval "$(slurm/local/start-cluster.sh /tmp/fuse-slurm)"     # prints: export SLURM_CONF=<run dir>/slurm.conf
#   SLURM_NODES=2 slurm/local/start-cluster.sh /tmp/fuse-slurm2   # a two-node cluster: node1, node2
#   slurm/local/stop-cluster.sh /tmp/fuse-slurm
#
# One node is called "localhost". With SLURM_NODES=N > 1 the cluster has N compute nodes node1..nodeN, each its own
# slurmd (Debian's Slurm is built with multiple-slurmd support) with its own port, spool, pid and log file, all on
# this host (NodeAddr 127.0.0.1): jobs see SLURM_NNODES, SLURM_NODEID and SLURMD_NODENAME as on a real cluster, and
# a node can be lost (its slurmd and its jobs killed) while the other runs on. They share this host's filesystem, as
# nodes share a cluster filesystem. The partition places each job on its least loaded nodes (LLN), so an array's
# tasks spread over the nodes instead of filling node1 first; slurmctld declares a node that stops answering DOWN
# (measured: ~30 s with SLURMD_TIMEOUT=10, its pings add the rest) and requeues its jobs.
#
# Everything lives in RUN_DIR (config, state, spool, logs, pid files); /etc/slurm is not touched, clients find the
# cluster through SLURM_CONF. Missing Debian packages are installed with apt-get; a munge key is created if
# absent; munged is started only if none answers. The pid files name exactly what this script started, which
# is all stop-cluster.sh stops. Needs root (slurmd runs jobs as their users). Settings from the environment:
#   SLURM_NODES (1), SLURM_CPUS (8 a node: more job slots than cores, so a DAG's parallel jobs run together),
#   SLURMCTLD_PORT (6817), SLURMD_PORT (6818; node i listens on SLURMD_PORT + i - 1), SLURMD_TIMEOUT (10 s),
#   SLURM_CRED_EXPIRE (5 s: the default 120 s makes each requeue wait ~3 minutes).
# Exit codes: 0 running, 2 not root, 3 the packages cannot be had, 4 a daemon did not come up (see its log).
set -euo pipefail

RUN_DIR="$(mkdir -p "${1:-${FUSE_SLURM_RUN_DIR:-/tmp/fuse-slurm}}" && cd "${1:-${FUSE_SLURM_RUN_DIR:-/tmp/fuse-slurm}}" && pwd)"
CPUS="${SLURM_CPUS:-8}"
NODES="${SLURM_NODES:-1}"
SLURMD_TIMEOUT="${SLURMD_TIMEOUT:-10}"
CTLD_PORT="${SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${SLURMD_PORT:-6818}"
CRED_EXPIRE="${SLURM_CRED_EXPIRE:-5}"
CONF="$RUN_DIR/slurm.conf"

say() { echo "start-cluster: $*" >&2; }

alive() {  # alive PIDFILE NAME: the pid in PIDFILE runs a process called NAME (a reused pid does not count)
    [ -s "$1" ] || return 1
    local pid; pid="$(cat "$1")"
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

node_names() {  # the compute nodes' names, one a line
    if [ "$NODES" = 1 ]; then echo localhost; else seq -f "node%g" 1 "$NODES"; fi
}

if ! [[ "$NODES" =~ ^[1-9][0-9]*$ ]]; then
    say "SLURM_NODES must be a positive integer, not '$NODES'"; exit 2
fi
if [ "$(id -u)" != 0 ]; then
    say "needs root (slurmd and munged run as system daemons)"; exit 2
fi

install_packages() {
    if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; then
        return 0
    fi
    if ! command -v apt-get >/dev/null; then
        say "sbatch/slurmctld/slurmd/munged are missing and there is no apt-get to install them"; exit 3
    fi
    say "installing slurmctld slurmd slurm-client munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; } >"$RUN_DIR/apt.log" 2>&1; then
        say "apt-get failed (see $RUN_DIR/apt.log)"; exit 3
    fi
}

resolve_hostname() {  # slurmd and the clients look up this host's name; minimal containers often cannot
    if ! getent hosts "$(hostname)" >/dev/null; then
        say "adding '127.0.0.1 $(hostname)' to /etc/hosts"
        echo "127.0.0.1 $(hostname)" >>/etc/hosts
    fi
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then return 0; fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge_works && break; sleep 0.1; done
    munge_works || { say "munged did not come up (see /var/log/munge/munged.log)"; exit 4; }
    cp /run/munge/munged.pid "$RUN_DIR/munged.pid"  # ours: stop-cluster.sh stops it
}

write_conf() {
    local mem
    mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
    mem=$(( ${mem:-4096} * 95 / 100 / NODES ))  # a RealMemory above what slurmd measures drains the node
    mkdir -p "$RUN_DIR/state"
    for node in $(node_names); do mkdir -p "$RUN_DIR/slurmd/$node"; done
    cat >"$CONF" <<CONF
# Written by slurm/local/start-cluster.sh: a private $NODES-node cluster on this host, state in $RUN_DIR.
ClusterName=fuselocal
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$CRED_EXPIRE
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$RUN_DIR/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,batch_sched_delay=0
ReturnToService=2
MinJobAge=86400
KillWait=5
InactiveLimit=0
SlurmdTimeout=$SLURMD_TIMEOUT
SlurmdParameters=config_overrides
StateSaveLocation=$RUN_DIR/state
SlurmdSpoolDir=$RUN_DIR/slurmd/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$RUN_DIR/slurmctld.log
SlurmdLogFile=$RUN_DIR/slurmd-%n.log

CONF
    local port=$SLURMD_PORT node
    for node in $(node_names); do
        echo "NodeName=$node NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN" >>"$CONF"
        port=$((port + 1))
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP$([ "$NODES" = 1 ] || echo " LLN=YES")" >>"$CONF"
}

wait_idle() {  # wait_idle NODE
    local state=""
    for _ in $(seq 150); do
        state="$(SLURM_CONF="$CONF" sinfo -h -n "$1" -o %T 2>/dev/null || true)"
        case "$state" in
            idle*|mixed*|allocated*) return 0 ;;
            down*|drain*) SLURM_CONF="$CONF" scontrol update nodename="$1" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    say "node $1 did not become idle (state: '${state:-none}'; see $RUN_DIR/slurmctld.log and slurmd-$1.log)"; exit 4
}

all_alive() {
    alive "$RUN_DIR/slurmctld.pid" slurmctld || return 1
    local node
    for node in $(node_names); do alive "$RUN_DIR/slurmd-$node.pid" slurmd || return 1; done
}

install_packages
resolve_hostname
start_munge
if all_alive; then
    say "already running in $RUN_DIR"
else
    alive "$RUN_DIR/slurmctld.pid" slurmctld || write_conf
    alive "$RUN_DIR/slurmctld.pid" slurmctld || /usr/sbin/slurmctld -f "$CONF" -i
    for node in $(node_names); do
        alive "$RUN_DIR/slurmd-$node.pid" slurmd || /usr/sbin/slurmd -f "$CONF" -N "$node"
    done
fi
for node in $(node_names); do wait_idle "$node"; done
say "$NODES-node SLURM up in $RUN_DIR ($(node_names | paste -sd ' '))"
echo "export SLURM_CONF=$CONF"
