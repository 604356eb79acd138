#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this machine (controller and compute node in one),
# for the `slurm` tests and for trying `slm jobs` by hand. Idempotent: installs nothing that is
# installed, starts nothing that runs. Everything it writes lives under $SLM_SLURM_DIR
# (default /tmp/slm-slurm) except /etc/munge/munge.key (written only when missing).
#
#   eval "$(bash scripts/slurm/start_local_cluster.sh)"     # sets SLURM_CONF in this shell
#   bash scripts/slurm/stop_local_cluster.sh                # stops the daemons by their pid files
#
# Progress goes to stderr; stdout carries only the `export SLURM_CONF=...` line. Needs root.
set -euo pipefail

DIR=${SLM_SLURM_DIR:-/tmp/slm-slurm}
CPUS=${SLM_SLURM_CPUS:-$(nproc)}
HOST=$(hostname -s)
CONF=$DIR/slurm.conf
log() { echo "start_local_cluster: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (the daemons run as root here)"; exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update && apt-get install -y slurm-wlm munge; } >&2
fi

mkdir -p "$DIR"/state "$DIR"/spool "$DIR"/log
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

# slurm.conf: rewritten only when it changes, so a running cluster keeps its config
NEW=$(cat <<CONFIG
# written by scripts/slurm/start_local_cluster.sh: one host is controller and the only node
ClusterName=slm-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${SLM_SLURMCTLD_PORT:-6817}
SlurmdPort=${SLM_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# job arrays: up to 10000 tasks; finished jobs stay visible to squeue for an hour
MaxArraySize=10001
MaxJobCount=100000
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONFIG
)
CHANGED=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW" ]; then
    printf '%s\n' "$NEW" > "$CONF"
    CHANGED=1
    log "wrote $CONF"
fi
export SLURM_CONF=$CONF

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munge: a key (1024 random bytes, mode 400) and the daemon
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    log "wrote /etc/munge/munge.key"
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge 2>/dev/null || true
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    munged --force --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" >&2
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n | unmunge >/dev/null || { log "munged did not come up"; exit 1; }
    log "started munged"
fi

if alive "$DIR/slurmctld.pid"; then
    log "slurmctld already running (pid $(cat "$DIR/slurmctld.pid"))"
    if [ "$CHANGED" = 1 ]; then scontrol reconfigure >&2 && log "told slurmctld to read the new slurm.conf"; fi
else
    slurmctld -f "$CONF" >&2
    log "started slurmctld"
fi
if alive "$DIR/slurmd.pid"; then
    log "slurmd already running (pid $(cat "$DIR/slurmd.pid"))"
else
    slurmd -f "$CONF" >&2
    log "started slurmd"
fi

# wait until the node takes jobs (and bring it back if an old state left it down or drained)
state=""
for i in $(seq 120); do
    state=$(sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle|mix|alloc) break ;;
        down*|drain*|drng*) [ $((i % 10)) = 5 ] && scontrol update NodeName="$HOST" State=RESUME >&2 2>&1 || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle|mix|alloc) log "node $HOST is $state ($CPUS CPUs); logs in $DIR/log" ;;
    *) log "node $HOST did not become idle (state: ${state:-no answer}); see $DIR/log"; exit 1 ;;
esac

echo "export SLURM_CONF=$CONF"
