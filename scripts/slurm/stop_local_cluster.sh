#!/usr/bin/env bash
# Stop the cluster that start_local_cluster.sh started: slurmd, slurmctld, munged, by the pids
# in their pid files (nothing else is touched). Keeps $SLM_SLURM_DIR for its logs.
set -uo pipefail

DIR=${SLM_SLURM_DIR:-/tmp/slm-slurm}
log() { echo "stop_local_cluster: $*" >&2; }

stop() {  # name pidfile
    local pid
    if [ ! -f "$2" ]; then log "$1: no pid file"; return; fi
    pid=$(cat "$2")
    if ! kill -0 "$pid" 2>/dev/null; then log "$1: not running"; rm -f "$2"; return; fi
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; log "$1: killed (pid $pid)"; else log "$1: stopped (pid $pid)"; fi
    rm -f "$2"
}

stop slurmd "$DIR/slurmd.pid"
stop slurmctld "$DIR/slurmctld.pid"
stop munged "$DIR/munged.pid"
