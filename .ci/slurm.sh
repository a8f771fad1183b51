#!/usr/bin/env bash
# A one-node SLURM on this machine, for the tests that submit real jobs (tests/test_submit_slurm.py).
#
#   bash .ci/slurm.sh up DIR     install slurm-wlm if missing, write DIR/slurm.conf, start slurmctld and
#                                slurmd (state, logs and PID files under DIR), wait until the node is idle
#   bash .ci/slurm.sh down DIR   stop both daemons by the PIDs in their PID files
#
# Clients need `export SLURM_CONF=DIR/slurm.conf`. auth/none: fine on a throwaway CI machine, never on a
# shared one. Recipe: ../shared/notes/slurm-local.md.
set -euo pipefail

cmd=${1:?usage: slurm.sh up|down DIR}
dir=${2:?usage: slurm.sh up|down DIR}

up() {
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null
    fi
    mkdir -p "$dir"/state "$dir"/spool "$dir"/log
    dir=$(cd "$dir" && pwd)
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat >"$dir/slurm.conf" <<CONF
ClusterName=foundry-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
KillWait=30
# Requeued and dependent jobs start within a second or two, not at the next 30 s backfill pass.
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    local state=""
    for _ in $(seq 1 120); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
        [ "$state" = idle ] && { echo "slurm: node $host idle ($cpus CPUs, ${mem_mb} MB), SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 0.5
    done
    echo "slurm: node not idle after 60 s (state: ${state:-none}); logs in $dir/log" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    return 1
}

down() {
    local name pid
    # Jobs a failed test left behind: cancelled through this SLURM (its own controller), so their
    # processes end with them.
    if [ -f "$dir/slurm.conf" ] && [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        export SLURM_CONF=$dir/slurm.conf
        scancel --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 1 70); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    for name in slurmd slurmctld; do
        [ -f "$dir/$name.pid" ] || continue
        pid=$(cat "$dir/$name.pid")
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
    echo "slurm: stopped (logs in $dir/log)"
}

case "$cmd" in
    up) up ;;
    down) down ;;
    *) echo "usage: slurm.sh up|down DIR" >&2; exit 2 ;;
esac
