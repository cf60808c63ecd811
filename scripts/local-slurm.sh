#!/usr/bin/env bash
# local-slurm.sh -- a real one-node Slurm cluster on this machine, for the runner's tests and CI.
#
#   scripts/local-slurm.sh start    install (Debian packages) and start munged, slurmctld, slurmd;
#                                   idempotent: a running cluster with an unchanged config is kept
#   scripts/local-slurm.sh stop     cancel this cluster's jobs, stop only the daemons `start` started
#                                   (by the PIDs it recorded, never by name)
#   scripts/local-slurm.sh status   print the recorded daemons and `sinfo`; exit 1 when down
#
# Debian 12 (slurm-wlm 22.05, munge 0.5), no systemd, run as root (jobs then run as root too).
# No slurmdbd/sacct: the runner reads job state from squeue and its own shard records.
# Knobs: LOCAL_SLURM_ROOT (state, logs, pids) [/var/tmp/bild-slurm], LOCAL_SLURM_CPUS (CPUs declared,
# may exceed nproc) [8], LOCAL_SLURM_MEM_MB [8000], LOCAL_SLURM_GPUS (fake gres GPUs: Slurm sets
# CUDA_VISIBLE_DEVICES, no CUDA behind them) [0], LOCAL_SLURM_PARTITION [debug], LOCAL_SLURM_TIMEOUT [60].
set -euo pipefail

ROOT=${LOCAL_SLURM_ROOT:-/var/tmp/bild-slurm}
CPUS=${LOCAL_SLURM_CPUS:-8}
MEM_MB=${LOCAL_SLURM_MEM_MB:-8000}
GPUS=${LOCAL_SLURM_GPUS:-0}
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
CONF_DIR=/etc/slurm                  # Debian's compiled-in default: clients need no SLURM_CONF
MARKER="# managed by bild-fairseq scripts/local-slurm.sh"
STARTED=$ROOT/run/started            # "name pid" of every daemon this script started

log() { printf '[local-slurm] %s\n' "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

# alive NAME PID: PID runs as NAME (no PID reuse) and is no zombie (PID 1 here reaps late)
alive() {
  [ -n "${2:-}" ] && [ "$(cat /proc/"$2"/comm 2>/dev/null)" = "$1" ] || return 1
  case "$(awk '{print $3}' /proc/"$2"/stat 2>/dev/null)" in Z|X|"") return 1 ;; esac
}
pid_from() { cat "$1" 2>/dev/null || true; }
# wait_daemon NAME PIDFILE LOG CMD...: poll CMD; fail fast, showing the log, if the daemon died
wait_daemon() {
  local name=$1 pidfile=$2 logf=$3; shift 3; local n=$((TIMEOUT * 10))
  while ! "$@" >/dev/null 2>&1; do
    if [ $n -lt $((TIMEOUT * 10 - 20)) ] && ! alive "$name" "$(pid_from "$pidfile")"; then
      tail -n 15 "$logf" >&2 || true; die "$name died during start-up (log: $logf)"
    fi
    n=$((n - 1)); [ $n -gt 0 ] || { tail -n 15 "$logf" >&2 || true; die "timed out waiting for $name"; }
    sleep 0.1
  done
}
record() { echo "$1 $2" >> "$STARTED"; log "started $1 (pid $2)"; }
stop_daemon() {  # stop_daemon NAME: SIGTERM each recorded NAME, wait up to 30 s, then SIGKILL
  local name=$1 n p
  [ -f "$STARTED" ] || return 0
  while read -r n p; do
    [ "$n" = "$name" ] && alive "$n" "$p" || continue
    kill -TERM "$p"
    for _ in $(seq 1 300); do alive "$n" "$p" || break; sleep 0.1; done
    if alive "$n" "$p"; then kill -KILL "$p"; log "killed $n (pid $p)"; else log "stopped $n (pid $p)"; fi
  done < "$STARTED"
  sed -i "/^$name /d" "$STARTED"
}
node_up() { sinfo -h -N -o %T 2>/dev/null | grep -Eqx 'idle|mixed|allocated|completing'; }

install_packages() {
  local p missing=""
  for p in munge slurm-client slurmctld slurmd; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  log "installing:$missing"
  # keep maintainer scripts from starting daemons through /etc/init.d with default settings
  local added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; added_policy=1
  fi
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

write_config() {  # sets CHANGED=1 when a config file had to change
  local stage; stage=$(mktemp -d)
  local gres_node=""
  if [ "$GPUS" -gt 0 ]; then
    install -d -m 0755 "$ROOT/fakegpu"
    for i in $(seq 0 $((GPUS - 1))); do  # gres File= must be a device: clone /dev/null's numbers
      [ -c "$ROOT/fakegpu/nvidia$i" ] || mknod -m 0666 "$ROOT/fakegpu/nvidia$i" c 1 3
    done
    gres_node=" Gres=gpu:$GPUS"
    printf '%s\nNodeName=localhost Name=gpu File=%s/fakegpu/nvidia[0-%d]\n' "$MARKER" "$ROOT" $((GPUS - 1)) > "$stage/gres.conf"
  fi
  cat > "$stage/slurm.conf" <<EOF
$MARKER (edit the script, not this file)
ClusterName=bild
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may restart after cred_expire+1 s (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
# CPUs are the consumable; otherwise each job takes the node's memory and jobs serialize
SelectTypeParameters=CR_CPU
# trust the declared CPUs/memory even where the machine has fewer
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=300
MaxArraySize=10001
$([ "$GPUS" -gt 0 ] && echo GresTypes=gpu)
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB$gres_node State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  install -d -m 0755 "$CONF_DIR"
  CHANGED=0
  local f
  for f in slurm.conf gres.conf; do
    if [ -f "$stage/$f" ]; then
      if [ -f "$CONF_DIR/$f" ] && ! head -1 "$CONF_DIR/$f" | grep -qF "$MARKER"; then
        [ -f "$CONF_DIR/$f.pre-local-slurm" ] || cp -p "$CONF_DIR/$f" "$CONF_DIR/$f.pre-local-slurm"
        log "kept the existing $CONF_DIR/$f as $f.pre-local-slurm"
      fi
      cmp -s "$stage/$f" "$CONF_DIR/$f" || { install -m 0644 "$stage/$f" "$CONF_DIR/$f"; CHANGED=1; }
    elif [ -f "$CONF_DIR/$f" ] && head -1 "$CONF_DIR/$f" | grep -qF "$MARKER"; then
      rm -f "$CONF_DIR/$f"; CHANGED=1
    fi
  done
  rm -rf "$stage"
}

start() {
  [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"
  install_packages
  install -d -m 0755 "$ROOT"
  install -d -o slurm -g slurm -m 0755 "$ROOT/run" "$ROOT/log"
  install -d -o slurm -g slurm -m 0700 "$ROOT/state"
  install -d -m 0755 "$ROOT/spool"
  install -d -o munge -g munge -m 0755 /run/munge   # no systemd to create munged's runtime dir
  touch "$STARTED"
  # forget recorded daemons that are gone (e.g. SIGKILLed with their CI runner)
  local n p
  while read -r n p; do alive "$n" "$p" && echo "$n $p"; done < "$STARTED" > "$STARTED.tmp" || true
  mv "$STARTED.tmp" "$STARTED"
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key

  write_config
  if [ "$CHANGED" = 1 ]; then log "config written to $CONF_DIR"; stop_daemon slurmd; stop_daemon slurmctld; fi

  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
  else
    runuser -u munge -- /usr/sbin/munged
    wait_daemon munged /run/munge/munged.pid /var/log/munge/munged.log sh -c 'munge -n | unmunge'
    record munged "$(pid_from /run/munge/munged.pid)"
  fi
  if alive slurmctld "$(pid_from "$ROOT/run/slurmctld.pid")"; then
    log "slurmctld already running (pid $(pid_from "$ROOT/run/slurmctld.pid"))"
  else
    /usr/sbin/slurmctld
    wait_daemon slurmctld "$ROOT/run/slurmctld.pid" "$ROOT/log/slurmctld.log" scontrol ping
    record slurmctld "$(pid_from "$ROOT/run/slurmctld.pid")"
  fi
  if alive slurmd "$(pid_from "$ROOT/run/slurmd.pid")"; then
    log "slurmd already running (pid $(pid_from "$ROOT/run/slurmd.pid"))"
  else
    # -N: the node is "localhost", whatever the hostname (a second slurmd would kill the first)
    /usr/sbin/slurmd -N localhost
    wait_daemon slurmd "$ROOT/run/slurmd.pid" "$ROOT/log/slurmd.log" test -s "$ROOT/run/slurmd.pid"
    record slurmd "$(pid_from "$ROOT/run/slurmd.pid")"
  fi
  local i
  for i in $(seq 1 $((TIMEOUT * 10))); do
    node_up && break
    # a node left DOWN by an earlier run
    [ "$i" = 10 ] && scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    sleep 0.1
  done
  node_up || die "node localhost did not become idle: $(sinfo -h -N -o '%T %E' 2>&1) (log: $ROOT/log/slurmd.log)"
  log "cluster up: $(sinfo -h -o '%P %a %D node(s) %T, %c CPUs' | tr '\n' ' ')"
}

stop() {
  if alive slurmctld "$(awk '$1=="slurmctld" {print $2}' "$STARTED" 2>/dev/null | tail -1)"; then
    local jobs; jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      # stopping slurmd does not kill running jobs: wait until they are gone (KillWait=5)
      for _ in $(seq 1 300); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
    fi
  fi
  local name
  for name in slurmd slurmctld munged; do stop_daemon "$name"; done
  log "stopped"
}

status() {
  [ -f "$STARTED" ] && sed 's/^/[local-slurm] started: /' "$STARTED"
  node_up && sinfo || { log "down"; return 1; }
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
