#!/usr/bin/env bash
# Emulated multi-node cluster on one machine: N "nodes" are network namespaces joined by veth pairs
# to a bridge, every link shaped with tc htb (both directions), and Open MPI runs across them (TCP
# between namespaces, shared memory inside one). Needs root and iproute2; netem is not used, so the
# latency is what the kernel gives (`latency` measures it).
#
# Usage: scripts/emulate-cluster.sh COMMAND ...
#   up N [--preset P | --rate MBIT] [--slots S]   create N nodes (S MPI slots each, default 2)
#   shape P|MBIT                                   reshape every link of the running cluster
#   down                                           remove everything (idempotent)
#   status                                         namespaces, links, qdiscs
#   latency                                        UDP round trip node0 <-> node1
#   run [MPIRUN OPTIONS] -- CMD ...                mpirun across the nodes (default: one rank a node)
#   grid [--model DIR] [--tokens T] [--reps R] [--passes N] [--stat fastest|median]
#        [--presets "P ..."]
#        [--sweep "MBIT ..."] [--skew US|auto] [--no-plan]
#        [--crossover BATCH [--lo MBIT] [--hi MBIT] [--pairs N] [--steps S]]
#                                                  measure TP/PP/DP layouts at each preset (sets up,
#                                                  measures, tears down) beside `parallm plan`;
#                                                  scripts/cluster/grid_svg.py draws its output
#                                                  --crossover: instead, bisect the link rate
#                                                  where PP=2 and TP=2 are equally fast at BATCH
#                                                  (alternating pairs), beside the planner
#   presets                                        the link presets and how they are scaled
#
# Environment: PLM_PREFIX (default plm: namespaces plm-node0.., bridge plm-br, veths plm-v0..),
# PLM_SUBNET (first three octets, default 10.213.0; refused if any route already covers it),
# PARALLM (the binary, default build/parallm), PLM_STATE (state dir, default /run/$PLM_PREFIX-cluster).
#
# Presets are scaled to this machine by the ratio that matters, link bandwidth : memory bandwidth
# of a rank (decode streams the weights, so a rank's memory bandwidth is its compute rate). An A100
# streams 2039 GB/s; per direction NVLink3 gives 300 GB/s (ratio 0.147), InfiniBand HDR 25 GB/s
# (0.0123), PCIe gen4 between GPUs through the host about 12 GB/s (0.0059), 10 GbE 1.25 GB/s
# (0.00061). The presets are those ratios times one rank's (one thread's) decode bandwidth here,
# PLM_RANK_GBPS: `grid` measures it first and scales its presets to it; `up`/`shape` take the
# variable, default 2.5 GB/s (`grid` prints the rate it measured on its "compute" line).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
PREFIX=${PLM_PREFIX:-plm}
SUBNET=${PLM_SUBNET:-10.213.0}
STATE=${PLM_STATE:-/run/$PREFIX-cluster}
PARALLM=${PARALLM:-$root/build/parallm}
RANK_GBPS=${PLM_RANK_GBPS:-2.5}
BR=$PREFIX-br
HOST_IP=$SUBNET.254
AGENT=$here/cluster/netns-agent.sh
PRESETS="nvlink ib pcie eth"

die() { echo "emulate-cluster.sh: $*" >&2; exit 1; }
ns() { echo "$PREFIX-node$1"; }

# Preset -> Mbit/s (0 = unshaped: the veth's own speed).
preset_ratio() {
  case "$1" in
    nvlink) echo 0.147 ;; ib) echo 0.0123 ;; pcie) echo 0.0059 ;; eth) echo 0.00061 ;;
    none) echo 0 ;;
    *) die "unknown preset '$1' (nvlink, ib, pcie, eth, none, or a rate in Mbit/s)" ;;
  esac
}
rate_of() {  # preset name or a number (Mbit/s)
  if [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; then echo "$1"; return; fi
  local r
  r=$(preset_ratio "$1") || exit 1  # (die in the command substitution only leaves it)
  awk -v r="$r" -v g="$RANK_GBPS" 'BEGIN { printf "%.0f\n", r * g * 8000 }'
}

need_root() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces and tc)"
  command -v ip >/dev/null && command -v tc >/dev/null || die "needs iproute2 (ip, tc)"
}

# Shapes one interface's egress: htb at RATE Mbit/s; 0 removes the shaping. The burst is 100 us of
# traffic (at least one 1600-byte frame): a real link serializes every message at its rate, and a
# larger bucket would let the small messages of decode (a few KB a step, with compute between)
# through at the veth's own speed. htb sends a packet larger than the bucket and goes into debt, so
# the GSO packets of veth are not dropped.
shape_dev() {  # NETNS-or-"" DEV MBIT BURST_BYTES
  local in=() dev=$2 mbit=$3
  [ -n "$1" ] && in=(ip netns exec "$1")
  "${in[@]}" tc qdisc del dev "$dev" root 2>/dev/null || true
  [ "$mbit" = 0 ] && return 0
  local burst=$4  # one packet: what passes at once after an idle spell is two packets (see cmd_shape)
  "${in[@]}" tc qdisc add dev "$dev" root handle 1: htb default 10
  "${in[@]}" tc class add dev "$dev" parent 1: classid 1:10 htb rate "${mbit}mbit" ceil "${mbit}mbit" quantum 30000 \
    burst "$burst" cburst "$burst"
}

cmd_shape() {
  need_root
  [ -f "$STATE/nodes" ] || die "no cluster is up (run: $0 up N)"
  local n mbit i
  n=$(cat "$STATE/nodes")
  mbit=$(rate_of "${1:?shape: give a preset or Mbit/s}") || exit 1
  # After an idle spell htb lets through its bucket (the burst) and one packet more before it
  # holds traffic to the rate; on a link that carries one message between two computes, that much
  # of every message passes at once (`grid` tells the planner: burst_bytes). Both are one
  # MTU, and the MTU is ~80 us of the link's rate within 1500 B (Ethernet's) and 64000 B: small on
  # slow links, and no more than ~12k packets a second on fast ones, above which the kernel's cost
  # per packet, paid on the cores the ranks compute on, rules (1500 B packets at 600 Mbit/s: bench
  # comm measured 49 MB/s of 75; 7500 B packets: 74). Not below 1500 B: at 25 Mbit/s with 576 B
  # packets a PP=2 stage computing while its last activation crossed ran its first layer at half
  # speed (7.6-8.3 ms against 4.2; batch 8, 31.7-32.7 ms a token), with 1500 B at full speed
  # (26.3-27.8 ms a token; 2026-12-03, Zen 5 box), and no network runs on packets that small.
  local mtu
  mtu=$(awk -v m="$mbit" 'BEGIN { b = (m == 0) ? 64000 : m * 1e6 / 8 * 8e-5;
                                  if (b < 1500) b = 1500; if (b > 64000) b = 64000; printf "%d\n", b }')
  for ((i = 0; i < n; i++)); do
    ip link set "$PREFIX-v$i" mtu "$mtu"
    ip netns exec "$(ns $i)" ip link set "$PREFIX-e$i" mtu "$mtu"
  done
  ip link set "$BR" mtu "$mtu"
  for ((i = 0; i < n; i++)); do
    shape_dev "" "$PREFIX-v$i" "$mbit" "$mtu"        # bridge -> node i (what node i receives)
    shape_dev "$(ns $i)" "$PREFIX-e$i" "$mbit" "$mtu"  # node i -> bridge (what node i sends)
  done
  echo "$mbit" >"$STATE/mbit"
  echo "$mtu" >"$STATE/mtu"
  echo "links shaped to ${mbit} Mbit/s each way ($1)$([ "$mbit" = 0 ] && echo ', unshaped'), MTU $mtu"
}

# The kernel's autogroups (sched_autogroup_enabled) schedule each session as one group, fairly
# against the others. Each node's daemon starts a session of its own, so ranks of two nodes that
# share a core were two groups: a stage waiting in short sleeps took the core from the stage that
# computed far more than a rank of its own group would (TP=2 x PP=2 on 2 cores, TP pairs inside
# the nodes: 15.6 ms a token with autogroups, 7.4-8.7 without; on one host, one group, 8.5-9.3).
# Real nodes do not share cores; while any emulated cluster is up the autogroups are off, and the
# last one down puts back the value it found. A kernel without them, or a read-only /proc/sys,
# leaves them as they are (`up` says so).
AUTOGROUP=/proc/sys/kernel/sched_autogroup_enabled
AG_DIR=/run/plm-autogroup  # one file per cluster up (its PREFIX), .orig = the value found
autogroups_off() {
  [ -e "$AUTOGROUP" ] || return 0
  mkdir -p "$AG_DIR"
  if [ -z "$(ls "$AG_DIR")" ]; then cat "$AUTOGROUP" >"$AG_DIR/.orig"; fi
  if echo 0 2>/dev/null >"$AUTOGROUP"; then
    touch "$AG_DIR/$PREFIX"
  else
    [ -n "$(ls "$AG_DIR")" ] || rm -rf "$AG_DIR"
    echo "emulate-cluster.sh: note: could not turn the scheduler's autogroups off ($AUTOGROUP);" \
      "ranks of two nodes sharing a core are scheduled as two groups" >&2
  fi
}
autogroups_back() {
  [ -e "$AG_DIR/$PREFIX" ] || return 0
  rm -f "$AG_DIR/$PREFIX"
  [ -z "$(ls "$AG_DIR")" ] || return 0
  cat "$AG_DIR/.orig" >"$AUTOGROUP" 2>/dev/null || true
  rm -rf "$AG_DIR"
}

cmd_down() {
  # Idempotent, and only ever our own names: namespaces PREFIX-node*, bridge PREFIX-br, veths
  # PREFIX-v* (a namespace's deletion takes its veth end and so the pair with it).
  local n
  autogroups_back
  for n in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-node[0-9]+$" || true); do
    ip netns pids "$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$n" 2>/dev/null || true
  done
  for n in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 |
             grep -E "^($PREFIX-v[0-9]+|$BR)$" || true); do
    ip link del "$n" 2>/dev/null || true
  done
  rm -rf "$STATE"
}

check_subnet() {
  # Refuse a subnet that any existing route or address already covers, other than the default
  # route: the cluster must not shadow or reach anything it did not create.
  if ip -o addr show | grep -q " $SUBNET\."; then die "an address in $SUBNET.0/24 exists already (PLM_SUBNET=...)"; fi
  if [ -n "$(ip route show root "$SUBNET.0/24")" ] ||
     [ -n "$(ip route show match "$SUBNET.0/24" | grep -v '^default')" ]; then
    die "a route already covers $SUBNET.0/24; choose another with PLM_SUBNET=A.B.C"
  fi
}

cmd_up() {
  need_root
  local n=${1:-}
  [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 64 ] || die "up: N must be 1..64, got '$n'"
  shift
  local preset=none slots=2
  while [ $# -gt 0 ]; do
    case "$1" in
      --preset|--rate) preset=${2:?$1 needs a value}; shift 2 ;;
      --slots) slots=${2:?--slots needs a value}; shift 2 ;;
      *) die "up: unknown option '$1'" ;;
    esac
  done
  rate_of "$preset" >/dev/null || exit 1
  cmd_down
  check_subnet
  # A failure (or ^C) half-way leaves nothing behind.
  # Our own traps while the cluster is half made, the caller's (grid's tear-down) back after.
  local saved_traps
  saved_traps=$(trap -p EXIT INT TERM)
  trap 'echo "emulate-cluster.sh: up failed; tearing down" >&2; cmd_down' EXIT
  trap 'exit 130' INT TERM
  mkdir -p "$STATE"
  autogroups_off
  ip link add "$BR" type bridge
  ip addr add "$HOST_IP/24" dev "$BR"
  ip link set "$BR" up
  local i
  : >"$STATE/hostfile"
  for ((i = 0; i < n; i++)); do
    ip netns add "$(ns $i)"
    ip link add "$PREFIX-v$i" type veth peer name "$PREFIX-e$i"
    ip link set "$PREFIX-e$i" netns "$(ns $i)"
    ip link set "$PREFIX-v$i" master "$BR" up
    # One MTU-sized packet per send (no GSO): htb lets a packet go whole while its bucket holds
    # any credit and charges it after, so a 64 KiB GSO packet on an idle link left at once and
    # was paid during the next compute (measured at 141 Mbit/s: a TP all-reduce of 8 KiB took
    # 57 us with GSO, 370 us without). shape sets the MTU to the link's rate.
    ip link set "$PREFIX-v$i" gso_max_segs 1
    ip netns exec "$(ns $i)" ip link set lo up
    ip netns exec "$(ns $i)" ip link set "$PREFIX-e$i" gso_max_segs 1
    ip netns exec "$(ns $i)" ip addr add "$SUBNET.$((i + 1))/24" dev "$PREFIX-e$i"
    ip netns exec "$(ns $i)" ip link set "$PREFIX-e$i" up
    echo "$(ns $i) slots=$slots" >>"$STATE/hostfile"
  done
  echo "$n" >"$STATE/nodes"
  echo "nodes: $(for ((i = 0; i < n; i++)); do printf '%s=%s ' "$(ns $i)" "$SUBNET.$((i + 1))"; done)"
  echo "bridge $BR $HOST_IP/24, $slots slots a node"
  cmd_shape "$preset"
  trap - EXIT INT TERM
  eval "$saved_traps"
}

cmd_status() {
  ip netns list | grep -E "^$PREFIX-node" || echo "(no namespaces)"
  ip -br link | grep -E "^($PREFIX-|$BR)" || echo "(no links)"
  local d
  for d in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^$PREFIX-v" || true); do
    tc class show dev "$d" | sed "s/^/$d: /"
  done
  [ -f "$STATE/mbit" ] && echo "rate: $(cat "$STATE/mbit") Mbit/s (0 = unshaped)"
  return 0
}

# Round trip of a 64-byte UDP datagram between two of our addresses, median of 200 (no ping on
# these machines; this is what the kernel's veth + bridge + qdisc path gives).
cmd_latency() {
  [ -f "$STATE/nodes" ] || die "no cluster is up"
  local n
  n=$(cat "$STATE/nodes")
  [ "$n" -ge 2 ] || die "latency needs 2 nodes"
  ip netns exec "$(ns 1)" /usr/bin/python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 47999)); s.settimeout(10)
try:
    while True:
        d, a = s.recvfrom(64)
        if d == b"q": break
        s.sendto(d, a)
except socket.timeout: pass' "$SUBNET.2" &
  local srv=$!
  sleep 0.3
  ip netns exec "$(ns 0)" /usr/bin/python3 -c '
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
t = []
for i in range(220):
    a = time.perf_counter(); s.sendto(b"x" * 64, (sys.argv[1], 47999)); s.recvfrom(64)
    t.append(time.perf_counter() - a)
s.sendto(b"q", (sys.argv[1], 47999))
t = sorted(t[20:])
print("latency node0 -> node1: round trip median %.1f us, p10 %.1f us, p90 %.1f us (UDP 64 B)"
      % (t[len(t) // 2] * 1e6, t[len(t) // 10] * 1e6, t[len(t) * 9 // 10] * 1e6))' "$SUBNET.2"
  wait "$srv" 2>/dev/null || true
}

# mpirun across the namespaces: the launch agent runs each node's daemon in its namespace; TCP and
# the daemons' out-of-band channel only on the cluster's subnet (the shaped links), shared memory
# (vader) between ranks of one namespace, and ranks yield when idle (every node shares this
# machine's cores). No binding: each node's daemon thinks it owns the machine and would bind its
# first rank to core 0, so that one rank a node put every rank of the job on one core (measured:
# TP=2 across two nodes 14.2 ms a token bound, 6.9 unbound; PP=2 19.0 against 11.5).
mpirun_args() {
  echo --allow-run-as-root --oversubscribe --hostfile "$STATE/hostfile" \
    --mca plm_rsh_agent "$AGENT" --mca plm_rsh_no_tree_spawn 1 \
    --mca btl tcp,self,vader --mca btl_tcp_if_include "$SUBNET.0/24" \
    --mca oob_tcp_if_include "$SUBNET.0/24" --mca mpi_yield_when_idle 1 --bind-to none
}

cmd_run() {
  [ -f "$STATE/nodes" ] || die "no cluster is up (run: $0 up N)"
  local opts=() n
  n=$(cat "$STATE/nodes")
  while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
  [ $# -gt 0 ] || die "run: no command (run [MPIRUN OPTIONS] -- CMD ...)"
  [ ${#opts[@]} -gt 0 ] || opts=(-np "$n" --map-by node)
  # shellcheck disable=SC2046
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    mpirun $(mpirun_args) "${opts[@]}" "$@"
}

cmd_presets() {
  local p
  echo "preset  ratio(link:A100 HBM)  Mbit/s here (x $RANK_GBPS GB/s a rank)"
  for p in $PRESETS; do printf '%-7s %-21s %s\n' "$p" "$(preset_ratio "$p")" "$(rate_of "$p")"; done
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) need_root; cmd_down; echo "cluster $PREFIX down" ;;
  shape) shift; cmd_shape "$@" ;;
  status) cmd_status ;;
  latency) cmd_latency ;;
  run) shift; cmd_run "$@" ;;
  grid) shift; source "$here/cluster/grid.sh"; cmd_grid "$@" ;;
  presets) cmd_presets ;;
  *) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
