#!/usr/bin/env bash
# slurm/cluster.sh -- run a real Slurm cluster of two nodes on this Debian 12 host.
#
#   sudo slurm/cluster.sh start    # install (if needed), configure and start everything
#   sudo slurm/cluster.sh status   # exit 0 only if the cluster accepts jobs
#   sudo slurm/cluster.sh stop     # stop every daemon again
#   sudo slurm/cluster.sh add-user NAME...  # let users created since submit jobs
#
# The point is to exercise the submitit/Hydra launcher against the genuine
# slurmctld/slurmd/slurmdbd (requeue, signals, arrays, sacct), not a mock.
#
# Daemons: munged -> mariadbd -> slurmdbd -> slurmctld -> one slurmd per node.
#
# Design notes (the "why"):
# * Daemons are always launched directly, never via systemctl/invoke-rc.d.
#   CI containers have no systemd as PID 1 and usually a policy-rc.d that
#   refuses to start services; launching directly is the one code path that
#   works everywhere. If a daemon is already running (e.g. systemd started
#   munge/mariadb when the packages were installed) it is reused, not doubled.
# * Processes are identified by their exact /proc/<pid>/comm, not by pid files
#   alone: after a crash/kill -9 the pid files are stale, and slurmctld,
#   slurmd and slurmdbd all SIGTERM whatever pid their old pid file names on
#   startup -- with pid reuse that could be an unrelated process. Stale pid
#   files are therefore deleted before any daemon is launched.
# * No cgroups: proctrack/linuxproc + task/none + jobacct_gather/linux work in
#   unprivileged containers and on cgroup v1 and v2 hosts alike. Memory is
#   scheduled (CR_Core_Memory) but not enforced by the kernel.
# * SlurmdParameters=config_overrides makes slurmd trust slurm.conf rather
#   than the detected hardware, so SLURM_CLUSTER_CPUS/MEM_MB may also
#   oversubscribe the machine (handy for big array tests) without the node
#   being drained as "Low RealMemory"/"Low CPUs".
# * Every wait is bounded; on failure the relevant daemon log tail is printed.
# * Two nodes on one host: the second is a second slurmd started with
#   "slurmd -N <name>" (works with Debian's Slurm 22.05), with its own port,
#   spool directory, pid file and log (%n in slurm.conf). Its name must
#   resolve to this host, as real node names resolve to their nodes (a
#   multi-node training addresses its workers by node name): "localhost" does
#   on every machine. Both nodes offer the whole machine's CPUs and memory
#   (config_overrides again), so any job that fits one node today fits
#   either; the second is weighted to be used only when the first is full or
#   a job asks for two nodes.
#
# Environment overrides (all optional):
#   SLURM_CLUSTER_NAME          ClusterName                      [mnisthpc]
#   SLURM_CLUSTER_PARTITION     partition name                   [debug]
#   SLURM_CLUSTER_ACCOUNT       accounting account for users     [mnisthpc]
#   SLURM_CLUSTER_USERS         users to associate with account  [root + $SUDO_USER]
#   SLURM_CLUSTER_CPUS          CPUs of the node                 [nproc]
#   SLURM_CLUSTER_MEM_MB        RealMemory of the node in MB     [95% of MemTotal]
#   SLURM_CLUSTER_DEF_MEM_PER_CPU  DefMemPerCPU in MB            [MEM_MB / CPUS]
#   SLURM_CLUSTER_TIMEOUT       seconds allowed for each wait    [60]
#   SLURM_CLUSTER_EXTRA_NODES   names of further nodes, each one more
#                               slurmd on this host; "" = one node   [localhost]

set -euo pipefail

readonly PROG="${0##*/}"

CLUSTER_NAME="${SLURM_CLUSTER_NAME:-mnisthpc}"
PARTITION="${SLURM_CLUSTER_PARTITION:-debug}"
ACCOUNT="${SLURM_CLUSTER_ACCOUNT:-mnisthpc}"
TIMEOUT="${SLURM_CLUSTER_TIMEOUT:-60}"
EXTRA_NODES="${SLURM_CLUSTER_EXTRA_NODES-localhost}"

readonly SLURM_ETC=/etc/slurm
readonly SLURM_LOG_DIR=/var/log/slurm
readonly SLURM_RUN_DIR=/run/slurm
readonly CTLD_STATE_DIR=/var/spool/slurmctld
readonly SLURMD_SPOOL_DIR=/var/spool/slurmd
readonly DB_NAME=slurm_acct_db
readonly DB_USER=slurm
readonly LOCK_FILE=/run/lock/slurm-cluster-sh.lock

# Clients must read the config this script writes, whatever the caller's env.
export SLURM_CONF="$SLURM_ETC/slurm.conf"
export DEBIAN_FRONTEND=noninteractive

# --- per-daemon facts --------------------------------------------------------
# comm names: mariadbd may also show up under its legacy name mysqld.
declare -A COMMS=(
  [munged]="munged"
  [mariadb]="mariadbd mysqld"
  [slurmdbd]="slurmdbd"
  [slurmctld]="slurmctld"
  [slurmd]="slurmd"
)
declare -A PIDFILE=(
  [munged]=/run/munge/munged.pid
  [mariadb]=/run/mysqld/mysqld.pid
  [slurmdbd]=$SLURM_RUN_DIR/slurmdbd.pid
  [slurmctld]=$SLURM_RUN_DIR/slurmctld.pid
  [slurmd]=$SLURM_RUN_DIR/slurmd.pid # the one-node layout's; now one per node, see slurmd_pidfile
)
declare -A LOGFILE=(
  [munged]=/var/log/munge/munged.log
  [mariadb]=$SLURM_LOG_DIR/mariadb.log
  [slurmdbd]=$SLURM_LOG_DIR/slurmdbd.log
  [slurmctld]=$SLURM_LOG_DIR/slurmctld.log
  [slurmd]=$SLURM_LOG_DIR/slurmd-*.log # one per node, see slurmd_logfile
)
readonly DAEMONS_UP=(munged mariadb slurmdbd slurmctld slurmd)
readonly DAEMONS_DOWN=(slurmd slurmctld slurmdbd mariadb munged)

# --- small helpers ------------------------------------------------------------
say() { printf '[%s] %s\n' "$PROG" "$*"; }
warn() { printf '[%s] WARNING: %s\n' "$PROG" "$*" >&2; }

# fail <daemon...> -- <message>: print the message plus the log tails of the
# daemons that are most likely to explain it, then exit non-zero.
fail() {
  local daemons=() d
  while (($#)) && [[ $1 != -- ]]; do daemons+=("$1"); shift; done
  shift || true
  printf '[%s] ERROR: %s\n' "$PROG" "$*" >&2
  local log
  for d in "${daemons[@]}"; do
    # (LOGFILE[slurmd] is a pattern: one log per node)
    for log in ${LOGFILE[$d]}; do
      if [[ -s $log ]]; then
        printf '\n----- last 25 lines of %s -----\n' "$log" >&2
        tail -n 25 "$log" >&2
      fi
    done
  done
  exit 1
}

# pid_is <pid> <daemon>: is <pid> a live (non-zombie) process of <daemon>?
# Matches the exact comm from /proc/<pid>/stat. Zombies matter: PID 1 in a
# container is often not a real init and reaps orphans late, so a killed
# daemon can linger as a zombie with its old comm for a while.
pid_is() {
  local pid=$1 name=$2 stat comm state c
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  # (a process may vanish at any moment, hence the silenced read)
  { read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
  comm=${stat#*(}
  comm=${comm%)*}
  state=${stat##*) }
  state=${state%% *}
  [[ $state == [ZX] ]] && return 1
  for c in ${COMMS[$name]}; do [[ $comm == "$c" ]] && return 0; done
  return 1
}

# Exact-comm scan of /proc. Deliberately no pgrep: procps is not guaranteed
# in minimal images, and "pgrep -f" style matching would hit unrelated
# processes (e.g. slurmstepd, or an editor with slurmd.conf open).
daemon_pids() {
  local name=$1 p
  for p in /proc/[0-9]*; do
    pid_is "${p#/proc/}" "$name" && printf '%s\n' "${p#/proc/}"
  done
  return 0
}

is_running() { [[ -n $(daemon_pids "$1") ]]; }

# For display: the pid from the pid file when it is valid (daemons fork
# short-lived helpers with the same comm, e.g. slurmd launching a step).
main_pid() {
  local name=$1 pid=""
  { read -r pid <"${PIDFILE[$name]}"; } 2>/dev/null || pid=""
  if pid_is "$pid" "$name"; then
    echo "$pid"
    return 0
  fi
  pid=$(daemon_pids "$name")
  echo "${pid%%$'\n'*}"
}

# A pid file whose pid is not (any more) our daemon is a trap: see header.
clear_stale_pidfile() {
  local name=$1 f=${PIDFILE[$1]} pid=""
  [[ -e $f ]] || return 0
  { read -r pid <"$f"; } 2>/dev/null || pid=""
  pid_is "$pid" "$name" || rm -f "$f"
}

# wait_for <seconds> <daemon|""> <description> <command...>
# Polls the command; gives up early if the daemon we are waiting on died.
wait_for() {
  local timeout=$1 daemon=$2 desc=$3
  shift 3
  local deadline=$((SECONDS + timeout))
  local logs=("${DAEMONS_UP[@]}")
  [[ -n $daemon ]] && logs=("$daemon")
  until "$@" >/dev/null 2>&1; do
    if [[ -n $daemon ]] && ! is_running "$daemon"; then
      fail "${logs[@]}" -- "$daemon died while waiting for: $desc"
    fi
    if ((SECONDS >= deadline)); then
      fail "${logs[@]}" -- "timed out after ${timeout}s waiting for: $desc"
    fi
    sleep 0.5
  done
}

# install_file <path> <mode> <owner> <content>: atomic write, the file is
# only replaced when the content differs.
install_file() {
  local path=$1 mode=$2 owner=$3 content=$4 tmp
  tmp=$(mktemp "$path.XXXXXX")
  printf '%s\n' "$content" >"$tmp"
  chmod "$mode" "$tmp"
  chown "$owner" "$tmp"
  if [[ -e $path ]] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    chmod "$mode" "$path"
    chown "$owner" "$path"
  else
    mv -f "$tmp" "$path"
  fi
}

# A daemon's config is "applied" when the checksum of the file it was started
# with is recorded next to its pid file. Comparing against that record (and
# not against "did start just rewrite the file") makes a re-run converge
# even if an earlier start was interrupted between writing the file and
# restarting the daemon, and also catches daemons started by someone else.
applied_file() { echo "$SLURM_RUN_DIR/$1.applied-conf"; }
mark_applied() { cksum <"$2" >"$(applied_file "$1")"; }
config_stale() { # <daemon> <conf>: running with a config other than <conf>?
  local rec
  is_running "$1" || return 1
  rec=$(cat "$(applied_file "$1")" 2>/dev/null) || return 0
  [[ $rec != "$(cksum <"$2")" ]]
}

short_hostname() { hostname -s 2>/dev/null || uname -n | cut -d. -f1; }

# The cluster's nodes: this host first, then the extra ones (each one more slurmd here).
node_names() {
  local host=$1 n
  printf '%s\n' "$host"
  for n in $EXTRA_NODES; do [[ $n == "$host" ]] || printf '%s\n' "$n"; done
}
# slurmd ports: the first node keeps SlurmdPort (6818); 6819 is slurmdbd's.
node_port() { (($1 == 0)) && echo 6818 || echo $((6820 + $1)); }
slurmd_pidfile() { echo "$SLURM_RUN_DIR/slurmd-$1.pid"; }
slurmd_logfile() { echo "$SLURM_LOG_DIR/slurmd-$1.log"; }
# Is the slurmd of node <name> running (its own pid file names a live slurmd)?
slurmd_running() {
  local pid=""
  { read -r pid <"$(slurmd_pidfile "$1")"; } 2>/dev/null || pid=""
  pid_is "$pid" slurmd
}

mysql_root() { mariadb --protocol=socket -uroot "$@"; }

# --- installation -------------------------------------------------------------
ensure_packages() {
  local pkgs=(slurm-wlm slurmdbd munge mariadb-server) missing=() p
  for p in "${pkgs[@]}"; do
    if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) != "install ok installed" ]]; then
      missing+=("$p")
    fi
  done
  ((${#missing[@]} == 0)) && return 0
  say "installing: ${missing[*]}"
  apt-get update -qq
  # Postinst scripts may try to start services; whether that works (systemd)
  # or is refused (policy-rc.d) does not matter, we start/reuse them below.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- munge -------------------------------------------------------------------
start_munged() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  install -d -o munge -g munge -m 0755 /run/munge
  # munged opens its log itself as user munge and insists on owning it.
  touch "${LOGFILE[munged]}"
  chown munge:munge "${LOGFILE[munged]}"
  chmod 0640 "${LOGFILE[munged]}"
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating munge key"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key --force
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key

  if ! is_running munged; then
    clear_stale_pidfile munged
    say "starting munged"
    # --force: a kill -9'd munged leaves its socket + lock behind; we have just
    # established that no munged is running, so it is safe to take them over.
    runuser -u munge -- /usr/sbin/munged --force >>"${LOGFILE[munged]}" 2>&1 9>&- ||
      fail munged -- "munged failed to start"
  fi
  wait_for "$TIMEOUT" munged "munge credential round trip" \
    bash -c 'munge -n | unmunge'
}

# --- MariaDB -------------------------------------------------------------------
start_mariadb() {
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  if [[ ! -d /var/lib/mysql/mysql ]]; then
    # Normally done by the package's postinst; redo it for wiped data dirs.
    say "initialising MariaDB data directory"
    install -d -o mysql -g mysql -m 0755 /var/lib/mysql
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql \
      --auth-root-authentication-method=socket >>"${LOGFILE[mariadb]}" 2>&1 ||
      fail mariadb -- "mariadb-install-db failed"
  fi
  if ! is_running mariadb; then
    clear_stale_pidfile mariadb
    say "starting mariadbd"
    # mariadbd does not daemonise itself; setsid -f detaches it from our
    # session so it survives the caller's shell/CI step. The two InnoDB
    # settings are the ones slurmdbd complains about if left at defaults
    # (it wants at least half of its 1 GiB buffer pool recommendation; the
    # pool is allocated lazily, so this costs little real memory).
    setsid -f /usr/sbin/mariadbd --user=mysql \
      --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 \
      </dev/null >>"${LOGFILE[mariadb]}" 2>&1 9>&-
  fi
  wait_for "$TIMEOUT" mariadb "MariaDB to accept connections" \
    mysql_root -e 'SELECT 1'
}

# The DB password only has to be shared between MariaDB and slurmdbd.conf, so
# it is generated once and afterwards read back from slurmdbd.conf; re-running
# start keeps both sides in sync (and slurmdbd.conf unchanged).
db_password() {
  local pw=""
  if [[ -r $SLURM_ETC/slurmdbd.conf ]]; then
    pw=$(sed -n '/^StoragePass=/{s///;p;q}' "$SLURM_ETC/slurmdbd.conf")
  fi
  # hex only: safe inside SQL quotes and slurmdbd.conf without escaping
  [[ -n $pw ]] || pw=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  printf '%s' "$pw"
}

setup_database() {
  local pw=$1
  mysql_root <<SQL || fail mariadb -- "could not create database/user for slurmdbd"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$pw';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
}

# --- slurm directories/config ---------------------------------------------------
prepare_slurm_dirs() {
  install -d -m 0755 "$SLURM_ETC"
  install -d -o "$SLURM_USER" -g "$SLURM_GROUP" -m 0755 "$SLURM_LOG_DIR" "$SLURM_RUN_DIR"
  install -d -o "$SLURM_USER" -g "$SLURM_GROUP" -m 0700 "$CTLD_STATE_DIR"
  install -d -o root -g root -m 0755 "$SLURMD_SPOOL_DIR" # slurmd runs as root
  local node host
  host=$(short_hostname)
  # The one-node layout kept the first node's spool (and the sockets of its
  # running job steps) in $SLURMD_SPOOL_DIR itself: point its per-node
  # directory there, so that a restarted slurmd finds those steps again.
  if [[ ! -e $SLURMD_SPOOL_DIR/$host && -e $SLURMD_SPOOL_DIR/cred_state ]]; then
    ln -s . "$SLURMD_SPOOL_DIR/$host"
  fi
  while read -r node; do
    [[ -e $SLURMD_SPOOL_DIR/$node ]] || install -d -o root -g root -m 0755 "$SLURMD_SPOOL_DIR/$node"
  done < <(node_names "$host")
  # slurmctld/slurmdbd open their logs after dropping to SlurmUser.
  local f
  for f in slurmctld slurmdbd; do
    touch "${LOGFILE[$f]}"
    chown "$SLURM_USER:$SLURM_GROUP" "${LOGFILE[$f]}"
  done
}

write_slurmdbd_conf() {
  local pw=$1
  # mode 600 + owned by SlurmUser: slurmdbd refuses world-readable configs
  # because they hold the DB password.
  install_file "$SLURM_ETC/slurmdbd.conf" 0600 "$SLURM_USER:$SLURM_GROUP" "\
# Generated by slurm/cluster.sh (overwritten on start).
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=$SLURM_USER
DebugLevel=info
LogFile=${LOGFILE[slurmdbd]}
PidFile=${PIDFILE[slurmdbd]}
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$pw"
}

# Usable memory in MB: MemTotal, or a smaller cgroup limit. In a container
# /proc/meminfo shows the host's memory, and scheduling against that would
# let jobs overrun the container's limit and get OOM-killed.
usable_mem_mb() {
  local mb lim="" rel
  mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
  rel=$(sed -n 's/^0:://p' /proc/self/cgroup) # cgroup v2
  if [[ -n $rel && -r /sys/fs/cgroup$rel/memory.max ]]; then
    lim=$(<"/sys/fs/cgroup$rel/memory.max")
  elif [[ -r /sys/fs/cgroup/memory.max ]]; then
    lim=$(</sys/fs/cgroup/memory.max)
  else # cgroup v1
    rel=$(sed -n 's/^[0-9]*:memory://p' /proc/self/cgroup)
    if [[ -n $rel && -r /sys/fs/cgroup/memory$rel/memory.limit_in_bytes ]]; then
      lim=$(<"/sys/fs/cgroup/memory$rel/memory.limit_in_bytes")
    elif [[ -r /sys/fs/cgroup/memory/memory.limit_in_bytes ]]; then
      lim=$(</sys/fs/cgroup/memory/memory.limit_in_bytes)
    fi
  fi
  # "max" (v2) or a huge number (v1) both mean unlimited.
  if [[ $lim =~ ^[0-9]+$ ]] && ((${#lim} < 16)) && ((lim / 1048576 < mb)); then
    mb=$((lim / 1048576))
  fi
  echo "$mb"
}

write_slurm_conf() {
  local host=$1 cpus mem defmem
  cpus=${SLURM_CLUSTER_CPUS:-$(nproc)}
  # ~5% headroom below the total, as slurmd reports slightly less than
  # MemTotal and the OS/daemons (MariaDB!) need some too.
  mem=${SLURM_CLUSTER_MEM_MB:-$(($(usable_mem_mb) * 95 / 100))}
  # Without a default, CR_Core_Memory gives a job with no --mem the whole
  # node's memory, which would serialise all jobs. Default: memory scales
  # with CPUs, so CPUs are what limits concurrency.
  defmem=${SLURM_CLUSTER_DEF_MEM_PER_CPU:-$((mem / cpus))}

  # The pretend GPU of every node (GresTypes in slurm.conf). Slurm counts a GPU by its
  # device file; /dev/null stands in for one.
  install_file "$SLURM_ETC/gres.conf" 0644 root:root "\
# Generated by slurm/cluster.sh (overwritten on start).
Name=gpu File=/dev/null
"
  install_file "$SLURM_ETC/slurm.conf" 0644 root:root "\
# Generated by slurm/cluster.sh (overwritten on start).
ClusterName=$CLUSTER_NAME
# 127.0.0.1: single-node cluster, do not depend on DNS/hosts for the hostname.
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$SLURM_USER
AuthType=auth/munge
# cred_expire also is how long a requeued job is held (BeginTime) before it
# may run again: the default 120 s makes every requeue test wait 2 minutes.
# 10 s is ample for step launches on one local node (a step's credential is
# checked by the slurmd as the step starts, a few milliseconds after it is made).
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_STATE_DIR
# %n: the node's name; each slurmd on this host has its own of each.
SlurmdSpoolDir=$SLURMD_SPOOL_DIR/%n
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=$SLURM_RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=${LOGFILE[slurmctld]}
SlurmdLogFile=$SLURM_LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true

# Container friendly: no cgroups needed (see header of cluster.sh).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
SwitchType=switch/none
SlurmdParameters=config_overrides

# One pretend GPU per node (gres.conf: a count, no device file): jobs may ask for
# it (--gres=gpu:1, --gpus-per-node=1) and accounting records it, so GPU-hours are
# tested on this cluster; nothing can compute on it.
GresTypes=gpu

# Scheduling: several 1-CPU jobs side by side.
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
# Tests wait for many short jobs: schedule batch jobs right at submit/
# completion instead of batching them up for up to 3 s, and run the periodic
# passes often (jobs whose BeginTime passes, e.g. after a requeue, are only
# picked up by those; the defaults are 60 s main / 30 s backfill).
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
PreemptType=preempt/none
PreemptMode=OFF

# Behaviour the submitit launcher relies on / is tested against.
JobRequeue=1
MaxArraySize=10001
MaxJobCount=100000
KillWait=30
MinJobAge=300
ReturnToService=2
SlurmdTimeout=300
SlurmctldTimeout=120
InactiveLimit=0
Waittime=0

# Accounting through slurmdbd so that sacct works; gres/gpu so that AllocTRES
# names the GPUs a job had (the report's GPU-hours). Associations, their
# limits and QoS are enforced, as on most sites: a user needs an association
# (register_accounting, cmd_add_user), and the QoS and sub-account that
# register_accounting makes give the tests Slurm's own QoS and association
# refusals and pending reasons.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageTRES=gres/gpu
AccountingStorageEnforce=associations,limits,qos
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none

$(node_lines "$host" "$cpus" "$mem")
PartitionName=$PARTITION Nodes=$(node_names "$host" | paste -sd, -) Default=YES MaxTime=INFINITE State=UP
# The first node alone: its CPUs are this machine's real cores (the nodes of the default
# partition share them), for benchmarks that read the idle CPUs (sinfo) as a real cluster's.
PartitionName=one Nodes=$(node_names "$host" | head -1) Default=NO MaxTime=INFINITE State=UP
# A partition with a time limit, as most sites have: the site preflight's tests ask it for more.
PartitionName=short Nodes=$(node_names "$host" | paste -sd, -) Default=NO MaxTime=00:10:00 State=UP"
}

# One NodeName line per node: the same size each, all on 127.0.0.1, each slurmd
# on its own port. Weight: the scheduler fills the first node before the others.
node_lines() {
  local host=$1 cpus=$2 mem=$3 node i=0
  while read -r node; do
    printf 'NodeName=%s NodeHostname=%s NodeAddr=127.0.0.1 Port=%s Weight=%s CPUs=%s Sockets=1 CoresPerSocket=%s ThreadsPerCore=1 RealMemory=%s Gres=gpu:1 State=UNKNOWN\n' \
      "$node" "$host" "$(node_port $i)" $((i + 1)) "$cpus" "$cpus" "$mem"
    i=$((i + 1))
  done < <(node_names "$host")
}

# --- slurm daemons ------------------------------------------------------------------
dbd_answers() { timeout 10 sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
  if config_stale slurmdbd "$SLURM_ETC/slurmdbd.conf"; then
    say "slurmdbd runs with an outdated slurmdbd.conf, restarting it"
    stop_daemon slurmdbd
  fi
  if ! is_running slurmdbd; then
    clear_stale_pidfile slurmdbd
    say "starting slurmdbd"
    /usr/sbin/slurmdbd >>"${LOGFILE[slurmdbd]}" 2>&1 9>&- ||
      fail slurmdbd mariadb -- "slurmdbd failed to start"
    mark_applied slurmdbd "$SLURM_ETC/slurmdbd.conf"
  fi
  # The first start creates the schema, which takes a few seconds.
  wait_for "$TIMEOUT" slurmdbd "slurmdbd to answer sacctmgr" dbd_answers
}

# Registering the cluster before slurmctld's first start means slurmctld
# finds its cluster in the DB right away and sends job records immediately.
register_accounting() {
  local out user users
  out=$(timeout 20 sacctmgr -n -P list cluster format=cluster) ||
    fail slurmdbd -- "sacctmgr list cluster failed"
  if ! grep -qx "$CLUSTER_NAME" <<<"$out"; then
    say "registering cluster $CLUSTER_NAME in accounting"
    timeout 20 sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null ||
      fail slurmdbd -- "sacctmgr add cluster failed"
  fi
  out=$(timeout 20 sacctmgr -n -P list account "$ACCOUNT" format=account) ||
    fail slurmdbd -- "sacctmgr list account failed"
  if [[ -z $out ]]; then
    timeout 20 sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER_NAME" \
      Description="mnist-hpc jobs" Organization=mnist-hpc >/dev/null ||
      fail slurmdbd -- "sacctmgr add account failed"
  fi
  register_limits
  users=${SLURM_CLUSTER_USERS:-root ${SUDO_USER:-}}
  for user in $users; do associate "$user"; done
}

# Two QoS and a sub-account with limits, for the tests of Slurm's own answers:
#   QoS small: at most 1 CPU, 1 GB and 5 minutes per job; without DenyOnLimit (Slurm's
#     default), so Slurm queues a job over them and it never starts (QOSMaxCpuPerJobLimit):
#     the site preflight refuses such a job itself;
#   QoS frozen: a group allowance of 0 CPUs: its jobs pend (QOSGrpCpuLimit);
#   account ${ACCOUNT}-frozen: the same for an association (AssocGrpCpuLimit).
# The users of ACCOUNT may use both QoS (default: normal) and the sub-account.
register_limits() {
  local out qos
  out=$(timeout 20 sacctmgr -n -P list qos format=name) || fail slurmdbd -- "sacctmgr list qos failed"
  for qos in small frozen; do
    if ! grep -qx "$qos" <<<"$out"; then
      timeout 20 sacctmgr -i add qos "$qos" >/dev/null || fail slurmdbd -- "sacctmgr add qos $qos failed"
    fi
  done
  # Set each start (a no-op when unchanged), so that an older cluster's QoS get today's limits.
  timeout 20 sacctmgr -i modify qos small set MaxTRESPerJob=cpu=1,mem=1024M MaxWall=5 Flags=-1 >/dev/null ||
    fail slurmdbd -- "sacctmgr modify qos small failed"
  timeout 20 sacctmgr -i modify qos frozen set GrpTRES=cpu=0 >/dev/null ||
    fail slurmdbd -- "sacctmgr modify qos frozen failed"
  out=$(timeout 20 sacctmgr -n -P list assoc cluster="$CLUSTER_NAME" account="$ACCOUNT" user= format=qos) ||
    fail slurmdbd -- "sacctmgr list assoc failed"
  if ! grep -qE '(^|,)small(,|$)' <<<"$out" || ! grep -qE '(^|,)frozen(,|$)' <<<"$out"; then
    # (+=: QoS an admin gave the account stay)
    timeout 20 sacctmgr -i modify account "$ACCOUNT" where cluster="$CLUSTER_NAME" \
      set QOS+=normal,small,frozen DefaultQOS=normal >/dev/null ||
      fail slurmdbd -- "sacctmgr modify account $ACCOUNT failed"
  fi
  out=$(timeout 20 sacctmgr -n -P list account "$ACCOUNT-frozen" format=account) ||
    fail slurmdbd -- "sacctmgr list account failed"
  if [[ -z $out ]]; then
    timeout 20 sacctmgr -i add account "$ACCOUNT-frozen" Parent="$ACCOUNT" Cluster="$CLUSTER_NAME" \
      GrpTRES=cpu=0 Description="jobs that pend on an association limit" Organization=mnist-hpc >/dev/null ||
      fail slurmdbd -- "sacctmgr add account $ACCOUNT-frozen failed"
  fi
}

# associate <user>: the user may submit in ACCOUNT (default) and ACCOUNT-frozen.
# An association made before its Unix user existed names no uid in slurmctld
# (it shows as user(4294967294)), and sbatch then refuses that user's jobs
# ("Invalid account"); it is made again, which makes slurmctld look the uid up.
associate() {
  local user=$1 account out
  if getent passwd "$user" >/dev/null && is_running slurmctld &&
    timeout 20 scontrol show assoc_mgr users="$user" flags=assoc 2>/dev/null | grep -q "UserName=$user(4294967294)"; then
    timeout 20 sacctmgr -i delete user "$user" >/dev/null || fail slurmdbd -- "sacctmgr delete user $user failed"
  fi
  for account in "$ACCOUNT" "$ACCOUNT-frozen"; do
    out=$(timeout 20 sacctmgr -n -P list assoc cluster="$CLUSTER_NAME" \
      account="$account" user="$user" format=user) ||
      fail slurmdbd -- "sacctmgr list assoc failed"
    if [[ -z $out ]]; then
      timeout 20 sacctmgr -i add user "$user" Account="$account" \
        Cluster="$CLUSTER_NAME" >/dev/null ||
        fail slurmdbd -- "sacctmgr add user $user failed"
    fi
  done
  out=$(timeout 20 sacctmgr -n -P list user "$user" format=defaultaccount) ||
    fail slurmdbd -- "sacctmgr list user failed"
  if [[ $out != "$ACCOUNT" ]]; then
    timeout 20 sacctmgr -i modify user "$user" set DefaultAccount="$ACCOUNT" >/dev/null ||
      fail slurmdbd -- "sacctmgr modify user $user failed"
  fi
}

ctld_up() {
  local out
  out=$(timeout 10 scontrol ping 2>&1) || return 1
  [[ $out == *"is UP"* ]]
}

node_state() {
  local out
  out=$(timeout 10 sinfo -h -N -n "$1" -o '%T' 2>/dev/null) || return 1
  echo "${out%%$'\n'*}"
}

# idle/mixed/allocated/completing without a trailing "*" (= not responding)
# are the states in which the node runs jobs; so is planned ("plnd": backfill
# keeps the node for a pending job that waits for more resources, e.g. one
# asking for more nodes than the partition has, and still starts jobs on it
# that end before then).
node_usable() {
  local st
  st=$(node_state "$1") || return 1
  [[ $st =~ ^(idle|mixed|allocated|completing|planned)$ ]]
}

start_slurmctld() {
  local d
  # Node definitions are only re-read on restart, not on reconfigure.
  for d in slurmd slurmctld; do
    if config_stale "$d" "$SLURM_CONF"; then
      say "$d runs with an outdated slurm.conf, restarting it"
      stop_daemon "$d"
    fi
  done
  # slurmctld refuses state saved by a different ClusterName (a safety check
  # against shared StateSaveLocations); for this throw-away cluster we drop
  # the old state instead.
  local cn_file=$CTLD_STATE_DIR/clustername
  if ! is_running slurmctld && [[ -s $cn_file ]] &&
    [[ $(<"$cn_file") != "$CLUSTER_NAME" ]]; then
    warn "StateSaveLocation belongs to cluster '$(<"$cn_file")', wiping it"
    find "$CTLD_STATE_DIR" -mindepth 1 -delete
  fi
  if ! is_running slurmctld; then
    clear_stale_pidfile slurmctld
    say "starting slurmctld"
    /usr/sbin/slurmctld >>"${LOGFILE[slurmctld]}" 2>&1 9>&- ||
      fail slurmctld -- "slurmctld failed to start"
    mark_applied slurmctld "$SLURM_CONF"
  fi
  wait_for "$TIMEOUT" slurmctld "slurmctld to answer scontrol ping" ctld_up
}

start_slurmd() {
  local host=$1 node
  while read -r node; do
    if ! slurmd_running "$node"; then
      rm -f "$(slurmd_pidfile "$node")"
      say "starting slurmd for node $node"
      /usr/sbin/slurmd -N "$node" >>"$(slurmd_logfile "$node")" 2>&1 9>&- ||
        fail slurmd -- "slurmd for node $node failed to start"
    fi
  done < <(node_names "$host")
  rm -f "${PIDFILE[slurmd]}" # the one-node layout's, if any
  mark_applied slurmd "$SLURM_CONF"
  while read -r node; do wait_node_usable "$node"; done < <(node_names "$host")
}

# Wait for registration. A node that registered but is DRAINED/DOWN (e.g.
# after slurmd was killed with jobs on it) is resumed once: this cluster
# exists to run jobs, not to preserve an admin's drain decision.
wait_node_usable() {
  local node=$1 deadline=$((SECONDS + TIMEOUT)) st resumed=0
  while ! node_usable "$node"; do
    slurmd_running "$node" || fail slurmd -- "slurmd of node $node died during node registration"
    st=$(node_state "$node" || true)
    if ((!resumed)) && [[ $st =~ ^(drained|draining|drain|down)$ ]]; then
      say "node $node is $st, resuming it"
      timeout 10 scontrol update NodeName="$node" State=RESUME || true
      resumed=1
    fi
    ((SECONDS < deadline)) ||
      fail slurmd slurmctld -- "node $node did not become usable within ${TIMEOUT}s (state: ${st:-unknown})"
    sleep 0.5
  done
}

# One real job end-to-end (srun -> slurmctld -> slurmd -> slurmstepd). Skipped
# when the node is fully allocated, since the check would just queue.
smoke_test() {
  local host=$1 st
  st=$(node_state "$host")
  if [[ $st == allocated ]]; then
    say "node fully allocated by existing jobs, skipping the test job"
    return 0
  fi
  timeout "$TIMEOUT" srun --quiet -N1 -n1 -t 1 -J cluster-sh-check true ||
    fail slurmctld slurmd -- "test job (srun -N1 true) failed"
}

# --- stop ---------------------------------------------------------------------
stop_daemon() {
  local name=$1 pids pid deadline grace=30
  pids=$(daemon_pids "$name")
  if [[ $name == slurmd ]]; then
    # Pid files of nodes whose slurmd is gone (any slurmd left is stopped below).
    local f
    for f in "$SLURM_RUN_DIR"/slurmd-*.pid; do
      [[ -e $f ]] && { read -r pid <"$f" || true; pid_is "${pid:-}" slurmd || rm -f "$f"; }
    done
  fi
  if [[ -z $pids ]]; then
    clear_stale_pidfile "$name"
    return 0
  fi
  say "stopping $name"
  if [[ $name == mariadb ]]; then
    grace=60
    # Graceful shutdown flushes InnoDB; fall back to SIGTERM below.
    timeout 60 mariadb-admin --protocol=socket -uroot shutdown >/dev/null 2>&1 || true
  fi
  for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
  deadline=$((SECONDS + grace))
  while is_running "$name" && ((SECONDS < deadline)); do sleep 0.2; done
  if is_running "$name"; then
    warn "$name did not exit within ${grace}s, sending SIGKILL"
    for pid in $(daemon_pids "$name"); do kill -KILL "$pid" 2>/dev/null || true; done
    sleep 0.5
  fi
  clear_stale_pidfile "$name"
}

# --- commands -------------------------------------------------------------------
print_status() {
  local host=$1 d pid
  echo "daemons:"
  for d in "${DAEMONS_UP[@]}"; do
    [[ $d == slurmd ]] && continue
    pid=$(main_pid "$d")
    if [[ -n $pid ]]; then
      printf '  %-10s running (pid %s)\n' "$d" "$pid"
    else
      printf '  %-10s stopped\n' "$d"
    fi
  done
  local node
  while read -r node; do
    pid=""
    { read -r pid <"$(slurmd_pidfile "$node")"; } 2>/dev/null || pid=""
    if pid_is "$pid" slurmd; then
      printf '  %-10s running (pid %s, node %s)\n' slurmd "$pid" "$node"
    else
      printf '  %-10s stopped (node %s)\n' slurmd "$node"
    fi
  done < <(node_names "$host")
  if is_running slurmctld; then
    echo "sinfo:"
    local out
    out=$(timeout 10 sinfo 2>&1) || out+="${out:+$'\n'}(sinfo failed)"
    printf '%s\n' "$out" | sed 's/^/  /'
  fi
}

# 0 only if every daemon is up and slurmctld would accept a job now.
cluster_ok() {
  local host=$1 d
  for d in "${DAEMONS_UP[@]}"; do is_running "$d" || return 1; done
  ctld_up || return 1
  local node
  while read -r node; do
    slurmd_running "$node" && node_usable "$node" || return 1
  done < <(node_names "$host")
  timeout 15 sbatch --test-only -p "$PARTITION" -n1 -t 1 --wrap true >/dev/null 2>&1
}

# Catch typos in overrides before they turn into a half-written slurm.conf.
check_number() {
  local var=$1 val=${!1:-}
  [[ -z $val || $val =~ ^[1-9][0-9]*$ ]] ||
    { echo "$PROG: $var must be a positive integer, got '$val'" >&2; exit 2; }
}

cmd_start() {
  local host t0=$SECONDS pw v
  for v in SLURM_CLUSTER_CPUS SLURM_CLUSTER_MEM_MB SLURM_CLUSTER_DEF_MEM_PER_CPU \
    SLURM_CLUSTER_TIMEOUT; do
    check_number "$v"
  done
  ensure_packages
  host=$(short_hostname)
  if getent passwd slurm >/dev/null; then
    SLURM_USER=slurm SLURM_GROUP=$(id -gn slurm)
  else
    SLURM_USER=root SLURM_GROUP=root
  fi
  prepare_slurm_dirs

  start_munged
  start_mariadb
  pw=$(db_password)
  setup_database "$pw"
  write_slurmdbd_conf "$pw"
  # slurm.conf is needed before slurmdbd is usable: sacctmgr finds slurmdbd
  # through AccountingStorageHost (without the file it falls back to DNS SRV).
  write_slurm_conf "$host"
  start_slurmdbd
  register_accounting
  start_slurmctld
  start_slurmd "$host"
  smoke_test "$host"

  say "cluster '$CLUSTER_NAME' is up (took $((SECONDS - t0))s)"
  print_status "$host"
}

# Running jobs are deliberately left alone: their slurmstepd processes keep
# running and re-attach when slurmd comes back (state survives in
# StateSaveLocation), just like a daemon restart on a real cluster.
cmd_stop() {
  local d
  for d in "${DAEMONS_DOWN[@]}"; do stop_daemon "$d"; done
  say "all daemons stopped"
}

# Users a test creates after the cluster started (tests/helpers.py): with
# associations enforced, their jobs are refused until they have one.
cmd_add_user() {
  (($#)) || { echo "usage: $PROG add-user USER..." >&2; exit 2; }
  is_running slurmdbd || fail slurmdbd -- "slurmdbd is not running: run $PROG start first"
  local user
  for user in "$@"; do associate "$user"; done
}

cmd_status() {
  local host
  host=$(short_hostname)
  print_status "$host"
  if cluster_ok "$host"; then
    say "cluster '$CLUSTER_NAME' accepts jobs"
  else
    say "cluster is NOT accepting jobs"
    return 1
  fi
}

main() {
  local cmd=${1:-}
  case $cmd in
    start | stop | status) ;;
    add-user) cmd=add_user ;;
    *)
      echo "usage: $PROG {start|stop|status|add-user USER...}" >&2
      exit 2
      ;;
  esac
  if [[ $cmd != status ]]; then
    # (status only reads /proc and talks to slurmctld, any user may run it)
    [[ $EUID -eq 0 ]] || { echo "$PROG: $cmd must run as root" >&2; exit 1; }
    # Serialise start/stop (e.g. two CI steps or two terminals at once).
    # Every daemon is launched with "9>&-": an inherited lock fd would keep
    # the lock held for the daemon's (and its jobs') whole lifetime.
    install -d /run/lock
    exec 9>"$LOCK_FILE"
    flock -w 300 9 || { echo "$PROG: could not get $LOCK_FILE" >&2; exit 1; }
  fi
  shift
  "cmd_$cmd" "$@"
}

main "$@"
