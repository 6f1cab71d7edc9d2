#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for tests: munged + slurmctld + slurmd, all state under
# $IOI_SLURM_DIR (default /tmp/ioi-slurm). Job steps (srun inside a batch job) read the default
# /etc/slurm/slurm.conf whatever SLURM_CONF says, so `start` links it there when no slurm.conf
# exists yet (and `stop` removes that link); a machine with its own slurm.conf is refused.
#   .ci/slurm-cluster.sh install   apt-get install slurm-wlm munge (skipped when present; needs root)
#   .ci/slurm-cluster.sh start     write slurm.conf, start the daemons, wait until the node is idle
#   .ci/slurm-cluster.sh stop      cancel its jobs, stop the daemons started by `start` (pid files)
#   .ci/slurm-cluster.sh env       print the environment clients need (SLURM_CONF=...)
# Partitions `cpu` and `gpu` (both this node, no GPUs) match profiles/slurm/config.yaml.
set -euo pipefail
DIR=${IOI_SLURM_DIR:-/tmp/ioi-slurm}
CTLD_PORT=${IOI_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${IOI_SLURM_SLURMD_PORT:-16818}
NODE=localhost

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || { echo "installing slurm-wlm and munge needs root (apt-get)" >&2; exit 1; }
    apt-get update -qq   # only reached when something is missing (.ci/run installs it up front)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start() {
    stop   # daemons left by an interrupted run (their pid files) would hold the ports
    rm -rf "$DIR/state" "$DIR/spool"   # a fresh cluster: no jobs recovered from an earlier run
    mkdir -p "$DIR"/{munge,spool,state,log}
    chmod 0700 "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 0400 "$DIR/munge/munge.key"
    fi
    local topology mem
    # the machine's sockets, cores and threads as slurmd sees them: `CPUs=$(nproc)` alone leaves
    # slurmctld one core per socket and one socket, i.e. a 1-CPU node under CR_Core
    topology=$(slurmd -C | head -1 | grep -o 'CPUs=[0-9]* .*ThreadsPerCore=[0-9]*')
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat > "$DIR/slurm.conf" <<CONF
ClusterName=ioi-test
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
# keep finished jobs visible to squeue (the executor's status command) for 10 minutes
MinJobAge=600
SchedulerParameters=sched_interval=1
MessageTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 $topology RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    export SLURM_CONF="$DIR/slurm.conf"
    if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$SLURM_CONF" ]; then
        :
    elif [ -e /etc/slurm/slurm.conf ]; then
        echo "/etc/slurm/slurm.conf exists (a real SLURM installation?): not starting a test cluster" >&2
        exit 1
    else
        mkdir -p /etc/slurm && ln -s "$SLURM_CONF" /etc/slurm/slurm.conf
    fi
    munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munge.seed" --force
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N "$NODE"
    for _ in $(seq 60); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -q '^idle'; then
            sinfo -N -o '%N %P %T %c %m'
            local node_cpus machine_cpus
            node_cpus=$(sinfo -h -N -o '%c' | head -1)
            machine_cpus=$(slurmd -C | head -1 | grep -o 'CPUs=[0-9]*' | cut -d= -f2)
            if [ "$node_cpus" != "$machine_cpus" ]; then
                echo "the SLURM node has $node_cpus CPUs, the machine $machine_cpus: see $SLURM_CONF" >&2
                exit 1
            fi
            return 0
        fi
        sleep 1
    done
    echo "the SLURM node did not come up:" >&2
    sinfo -N -l >&2 || true
    tail -20 "$DIR"/log/*.log >&2 || true
    exit 1
}

stop() {
    # cancel the test cluster's jobs first, so no slurmstepd or job outlives the daemons
    local ctld pid pids=()
    ctld=$(cat "$DIR/slurmctld.pid" 2>/dev/null || true)
    if [ -n "$ctld" ] && kill -0 "$ctld" 2>/dev/null; then
        SLURM_CONF="$DIR/slurm.conf" scancel --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 20); do
            [ -z "$(SLURM_CONF="$DIR/slurm.conf" squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
            sleep 1
        done
    fi
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        pid=$(cat "$pidfile" 2>/dev/null || true)   # a daemon removes its pid file as it exits
        if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
            pids+=("$pid")
        fi
    done
    for pid in "${pids[@]}"; do   # wait until each has exited (their ports are free again)
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    done
    rm -f "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"
    if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$DIR/slurm.conf" ]; then
        rm -f /etc/slurm/slurm.conf
    fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    env) echo "SLURM_CONF=$DIR/slurm.conf" ;;
    *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
