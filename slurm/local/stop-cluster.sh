#!/usr/bin/env bash
# Stop what slurm/local/start-cluster.sh started in RUN_DIR, and nothing else: its jobs, its slurmd (one a node), slurmctld and
# munged if (and only if) that script started it. The run dir (state, logs) is kept; delete it to start fresh.
set -uo pipefail

RUN_DIR="${1:-${FUSE_SLURM_RUN_DIR:-/tmp/fuse-slurm}}"
CONF="$RUN_DIR/slurm.conf"

pid_of() {  # pid_of PIDFILE NAME: the pid if it still runs a process called NAME (a reused pid does not count)
    [ -s "$1" ] || return 1
    local pid; pid="$(cat "$1")"
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ] && echo "$pid"
}

stop() {  # stop PIDFILE NAME
    local pid
    pid="$(pid_of "$1" "$2")" || { rm -f "$1"; return 0; }
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null
    rm -f "$1"
}

if pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null; then
    # Every job of this private cluster was submitted to it; cancel them so no job outlives its slurmd.
    SLURM_CONF="$CONF" scancel --user="$(id -un)" 2>/dev/null || true
    sleep 1
fi
for pidfile in "$RUN_DIR"/slurmd-*.pid; do [ -e "$pidfile" ] && stop "$pidfile" slurmd; done
stop "$RUN_DIR/slurmctld.pid" slurmctld
stop "$RUN_DIR/munged.pid" munged
echo "stop-cluster: stopped the cluster in $RUN_DIR" >&2
