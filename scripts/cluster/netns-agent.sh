#!/usr/bin/env bash
# Open MPI's launch agent for scripts/emulate-cluster.sh (--mca plm_rsh_agent): where ssh would log
# in to HOST and run the daemon's command line, this runs it inside HOST's network namespace (the
# fake host names are the namespace names), in a UTS namespace of its own whose host name is HOST,
# so that Open MPI sees one host per namespace and never pairs ranks of two "nodes" over shared
# memory, which would bypass the shaped links.
# Usage (by mpirun): netns-agent.sh [ssh-style options] HOST COMMAND...
set -euo pipefail
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done  # ssh-style flags (-x) mean nothing here
host=${1:?netns-agent.sh: no host given}
shift
if ! ip netns list | awk '{print $1}' | grep -qx -- "$host"; then
  echo "netns-agent.sh: no network namespace named '$host' (is the cluster up?)" >&2
  exit 1
fi
exec ip netns exec "$host" unshare --uts sh -c 'hostname "$0" && exec sh -c "$1"' "$host" "$*"
