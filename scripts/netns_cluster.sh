#!/usr/bin/env bash
# A two-node test cluster on one machine: network namespaces node0 and node1, each with its own host name,
# process table and sshd, joined by two veth links (two NICs per node, like the multi-NIC hosts of FlagAI
# issues #368/#395). The filesystem is shared, as a cluster's must be. Needs root (CAP_NET_ADMIN), ip, sshd.
#
#   bash scripts/netns_cluster.sh up <state_dir>          build it; writes <state_dir>/env (AQUILA_SSH=...)
#   bash scripts/netns_cluster.sh exec <state_dir> <node> <cmd...>   run a command on node0 or node1
#   bash scripts/netns_cluster.sh down <state_dir>        tear it down (also after a partial `up`)
#   bash scripts/netns_cluster.sh shell [<state_dir>]     up, an interactive shell on node0, down on exit
#
# Addresses exist only inside the namespaces: eth0 10.211.0.1 / 10.211.0.2, eth1 10.211.1.1 / 10.211.1.2.
# Nothing system-wide changes: keys, sshd configs, pid files and known_hosts live in <state_dir>, and sshd reads
# only its own config (no PAM). The one exception: sshd insists on /run/sshd; it is created if missing and
# removed again by `down` (unless some sshd still runs). Set NETNS_PREFIX to name the namespaces
# <prefix>node0/<prefix>node1 instead.
set -euo pipefail

ME="$(basename "$0")"
die() { echo "error: $ME: $*" >&2; exit 2; }
PREFIX="${NETNS_PREFIX:-}"
NODES=(node0 node1)
NET=10.211

ns_of() { printf '%s%s' "$PREFIX" "$1"; }

# The host pid of a node's sshd (PID 1 of its pid namespace): the child of the `unshare` we started.
node_pid() {
  local upid
  upid="$(cat "$STATE/$1/unshare.pid" 2>/dev/null)" || die "$1 is not running (no $STATE/$1/unshare.pid)"
  cat "/proc/$upid/task/$upid/children" 2>/dev/null | awk '{print $1}'
}

sshd_running() {
  local exe
  for exe in /proc/[0-9]*/exe; do
    [[ "$(readlink "$exe" 2>/dev/null)" == /usr/sbin/sshd ]] && return 0
  done
  return 1
}

cmd_down() {
  local node upid pids=() pid
  for node in "${NODES[@]}"; do
    upid="$(cat "$STATE/$node/unshare.pid" 2>/dev/null || true)"
    # unshare --kill-child: its death kills sshd, PID 1 of the node, and with it every process of the node.
    if [[ -n "$upid" ]] && grep -qa unshare "/proc/$upid/cmdline" 2>/dev/null; then
      pids+=("$upid" $(cat "/proc/$upid/task/$upid/children" 2>/dev/null))
      kill -9 "$upid" 2>/dev/null || true
    fi
    ip netns del "$(ns_of "$node")" 2>/dev/null || true  # also removes the veth ends inside it
  done
  for pid in "${pids[@]}"; do  # gone before /run/sshd is judged unused
    for _ in $(seq 30); do [[ -e "/proc/$pid/exe" ]] || break; sleep 0.1; done
  done
  ip link del "${PREFIX}aq0" 2>/dev/null || true  # ends left in the root namespace by a failed `up`
  ip link del "${PREFIX}aq1" 2>/dev/null || true
  if [[ -f "$STATE/created_run_sshd" ]] && ! sshd_running; then  # another cluster's sshd may still need it
    rmdir /run/sshd 2>/dev/null || true
  fi
  # Only what `up` wrote (never a recursive delete of whatever directory was passed).
  for node in "${NODES[@]}"; do
    rm -f "$STATE/$node"/{host_key,host_key.pub,sshd_config,sshd.pid,sshd.log,unshare.pid}
    rmdir "$STATE/$node" 2>/dev/null || true
  done
  rm -f "$STATE"/{client_key,client_key.pub,authorized_keys,known_hosts,ssh_config,env,created_run_sshd}
  rmdir "$STATE" 2>/dev/null || true
}

write_sshd_config() {  # <node>
  cat >"$STATE/$1/sshd_config" <<EOF
ListenAddress 0.0.0.0
Port 22
HostKey $STATE/$1/host_key
PidFile $STATE/$1/sshd.pid
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
PrintMotd no
LogLevel ERROR
EOF
}

cmd_up() {
  [[ "$(id -u)" == 0 ]] || die "needs root (network namespaces need CAP_NET_ADMIN)"
  local tool
  for tool in ip unshare nsenter ssh ssh-keygen /usr/sbin/sshd; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install iproute2 openssh-server openssh-client)"
  done
  for node in "${NODES[@]}"; do
    ! ip netns list | grep -qw "$(ns_of "$node")" || die "namespace $(ns_of "$node") exists already (another cluster?)"
  done
  [[ ! -e "$STATE/env" ]] || die "$STATE already holds a cluster (run: $ME down $STATE)"
  mkdir -p "$STATE"
  trap 'rc=$?; [[ $rc -eq 0 ]] || cmd_down' EXIT  # a failed `up` leaves nothing behind
  if [[ ! -d /run/sshd ]]; then
    mkdir -m 0755 /run/sshd && : >"$STATE/created_run_sshd"
  fi

  ssh-keygen -q -t ed25519 -N '' -C aquila-netns-client -f "$STATE/client_key"
  cp "$STATE/client_key.pub" "$STATE/authorized_keys"
  : >"$STATE/known_hosts"
  local i node ns link
  for i in 0 1; do
    node="${NODES[$i]}"
    ns="$(ns_of "$node")"
    mkdir -p "$STATE/$node"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ssh-keygen -q -t ed25519 -N '' -C "$node" -f "$STATE/$node/host_key"
    echo "$NET.0.$((i + 1)),$NET.1.$((i + 1)) $(cut -d' ' -f1-2 "$STATE/$node/host_key.pub")" >>"$STATE/known_hosts"
    write_sshd_config "$node"
  done
  # Two links between the nodes: eth0 on 10.211.0.0/24 and eth1 on 10.211.1.0/24.
  for link in 0 1; do
    ip link add "${PREFIX}aq$link" type veth peer name "${PREFIX}aq${link}b"
    for i in 0 1; do
      local end="${PREFIX}aq$link"
      [[ "$i" == 1 ]] && end="${PREFIX}aq${link}b"
      ns="$(ns_of "${NODES[$i]}")"
      ip link set "$end" netns "$ns"
      ip -n "$ns" link set "$end" name "eth$link"
      ip -n "$ns" addr add "$NET.$link.$((i + 1))/24" dev "eth$link"
      ip -n "$ns" link set "eth$link" up
    done
  done
  cat >"$STATE/ssh_config" <<EOF
Host *
  User root
  IdentityFile $STATE/client_key
  IdentitiesOnly yes
  UserKnownHostsFile $STATE/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 5
  LogLevel ERROR
EOF
  chmod 600 "$STATE/ssh_config" "$STATE/client_key"

  # Each node: its own network (ip netns), host name, pid table and /proc (unshare), with sshd as its PID 1.
  for node in "${NODES[@]}"; do
    setsid ip netns exec "$(ns_of "$node")" unshare --pid --fork --kill-child --mount-proc --uts \
      sh -c "hostname $node && exec /usr/sbin/sshd -D -e -f '$STATE/$node/sshd_config'" \
      >"$STATE/$node/sshd.log" 2>&1 </dev/null &
    echo $! >"$STATE/$node/unshare.pid"
    disown
  done
  local deadline=$((SECONDS + 20))
  for i in 0 1; do
    until ip netns exec "$(ns_of "${NODES[$i]}")" ssh -F "$STATE/ssh_config" "$NET.0.$((i + 1))" true </dev/null 2>/dev/null; do
      [[ $SECONDS -lt $deadline ]] || die "sshd on ${NODES[$i]} did not answer within 20 s: $(tail -n 3 "$STATE/${NODES[$i]}/sshd.log")"
      sleep 0.2
    done
  done
  trap - EXIT
  {
    echo "AQUILA_SSH=ssh -F $STATE/ssh_config"
    for i in 0 1; do echo "${NODES[$i]^^}_ADDRS=$NET.0.$((i + 1)) $NET.1.$((i + 1))"; done
  } >"$STATE/env"
  echo "cluster up: node0 = 10.211.0.1 (eth0) 10.211.1.1 (eth1), node1 = 10.211.0.2 (eth0) 10.211.1.2 (eth1)"
  echo "run on node0: bash $0 exec $STATE node0 <cmd...>    with AQUILA_SSH='ssh -F $STATE/ssh_config'"
}

cmd_exec() {  # <node> <cmd...>
  [[ $# -ge 2 ]] || die "usage: $ME exec <state_dir> <node> <cmd...>"
  local node="$1" pid
  shift
  [[ " ${NODES[*]} " == *" $node "* ]] || die "no node '$node' (node0 or node1)"
  pid="$(node_pid "$node")"
  [[ -n "$pid" ]] || die "$node is not running"
  # The node's network, host name, pids and /proc; our environment and working directory carry over.
  exec nsenter -t "$pid" -n -u -p -m --wd="$PWD" -- "$@"
}

cmd_shell() {
  STATE="${1:-$(mktemp -d /tmp/aquila-netns.XXXXXX)}"
  [[ $# -ge 1 ]] || rmdir "$STATE"
  cmd_up
  trap cmd_down EXIT
  echo "a shell on node0 (exit to tear the cluster down)"
  AQUILA_SSH="ssh -F $STATE/ssh_config" nsenter -t "$(node_pid node0)" -n -u -p -m --wd="$PWD" -- "${SHELL:-bash}" || true
}

[[ $# -ge 1 ]] || die "usage: $ME up|down|exec|shell <state_dir> ..."
verb="$1"
shift
case "$verb" in
  up | down | exec)
    [[ $# -ge 1 ]] || die "usage: $ME $verb <state_dir> ..."
    STATE="$(realpath -m "$1")"
    shift
    "cmd_$verb" "$@"
    ;;
  shell) cmd_shell "$@" ;;
  *) die "unknown command '$verb' (up, down, exec, shell)" ;;
esac
