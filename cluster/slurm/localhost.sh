#!/usr/bin/env bash
# A real Slurm on this one machine, for the tests and for trying the batch script without a
# cluster: munged, slurmctld and two slurmd daemons (nodes "n1" and "n2", both on 127.0.0.1,
# 2 CPUs each) whose configuration, state, sockets and logs all live under STATE_DIR.
#
#   cluster/slurm/localhost.sh start STATE_DIR   # installs Slurm and munge where missing, starts
#   export SLURM_CONF=STATE_DIR/slurm.conf        # then sbatch / squeue / scancel talk to it
#   cluster/slurm/localhost.sh stop STATE_DIR    # cancels every job, stops the daemons
#
# The daemons listen on LOCAL_SLURM_PORT (default 16817) and the three ports above it.
# Installing needs root and apt-get (Debian's slurmctld, slurmd, slurm-client and munge); the
# daemons run as root. Exit status 3 means Slurm cannot be had here (the reason is printed);
# anything else non-zero is a real failure. `start` is idempotent: running daemons are kept.
set -euo pipefail

cmd=${1:-}
state=${2:-}
if [[ -z "$cmd" || -z "$state" ]]; then
    echo "usage: $0 start|stop STATE_DIR" >&2
    exit 2
fi
mkdir -p "$state"
state=$(cd "$state" && pwd)
conf=$state/slurm.conf
export SLURM_CONF=$conf
NODES=(n1 n2)
PORT=${LOCAL_SLURM_PORT:-16817}

unavailable() { echo "localhost Slurm unavailable: $*" >&2; exit 3; }

install_slurm() {
    local missing=0 tool
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null || missing=1
    done
    [[ $missing == 0 ]] && return 0
    local why="slurmctld/slurmd/munge are not installed and"
    [[ $(id -u) == 0 ]] || unavailable "$why this is not root"
    command -v apt-get >/dev/null || unavailable "$why there is no apt-get"
    local pkgs="slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends $pkgs >"$state/apt.log" 2>&1 || {
        apt-get update -q >>"$state/apt.log" 2>&1 &&
            apt-get install -y -q --no-install-recommends $pkgs >>"$state/apt.log" 2>&1
    } || unavailable "apt-get install $pkgs failed (see $state/apt.log)"
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

start_munge() {
    alive "$state/munged.pid" && return 0
    mkdir -p "$state/munge" && chmod 700 "$state/munge"
    if [[ ! -f "$state/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 2>/dev/null
        chmod 400 "$state/munge/munge.key"
    fi
    munged --force --key-file="$state/munge/munge.key" --socket="$state/munge/munge.sock" \
        --pid-file="$state/munged.pid" --log-file="$state/munged.log" \
        --seed-file="$state/munge/munge.seed"
}

write_conf() {
    local host
    host=$(hostname -s)
    mkdir -p "$state/ctld" "$state/log" "${NODES[@]/#/$state/spool/}"
    cat >"$conf" <<EOF
# Written by cluster/slurm/localhost.sh: two nodes on 127.0.0.1 (one slurmd each).
ClusterName=localhost
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge/munge.sock
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
KillWait=30
MinJobAge=30
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmdSpoolDir=$state/spool/%n
StateSaveLocation=$state/ctld
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
NodeName=DEFAULT CPUs=2 RealMemory=8000 State=UNKNOWN
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2))
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 3))
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install_slurm
    start_munge
    [[ -f "$conf" ]] || write_conf
    alive "$state/slurmctld.pid" || slurmctld -f "$conf"
    local node
    for node in "${NODES[@]}"; do
        alive "$state/slurmd-$node.pid" || slurmd -f "$conf" -N "$node"
    done
    local i
    for i in $(seq 60); do
        if [[ $(sinfo -h -o '%T' 2>/dev/null | sort -u) == idle ]]; then
            echo "localhost Slurm up: SLURM_CONF=$conf"
            return 0
        fi
        sleep 0.5
    done
    echo "localhost Slurm: nodes did not become idle; sinfo says:" >&2
    sinfo -N >&2 || true
    exit 1
}

stop_pid() {
    local pidfile=$1 i
    alive "$pidfile" || return 0
    kill "$(cat "$pidfile")" 2>/dev/null || return 0
    for i in $(seq 40); do
        alive "$pidfile" || return 0
        sleep 0.25
    done
    kill -9 "$(cat "$pidfile")" 2>/dev/null || true
}

stop() {
    if alive "$state/slurmctld.pid"; then
        scancel --full --quiet --user "$(id -un)" || true
        local i
        for i in $(seq 90); do  # KillWait (30 s) and then some
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 1
        done
    fi
    local node
    for node in "${NODES[@]}"; do
        stop_pid "$state/slurmd-$node.pid"
    done
    stop_pid "$state/slurmctld.pid"
    stop_pid "$state/munged.pid"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop STATE_DIR" >&2; exit 2 ;;
esac
