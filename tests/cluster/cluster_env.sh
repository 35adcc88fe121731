# shellcheck shell=bash
# Sourced by the tests that bring an emulated cluster up (scripts/emulate-cluster.sh): exits 77
# (skip) without root, mpirun, tc or network namespaces; gives the test a namespace prefix, subnet
# and state directory of its own (so a grid run beside it, prefix plm, is left alone), the script
# as $S, the binary as $PARALLM, a temporary directory $tmp removed at exit after the cluster is
# taken down, and leftovers(): the test's namespaces and links still there.
# Usage (after set -euo pipefail): bin=PARALLM; source cluster_env.sh
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
S=$src/scripts/emulate-cluster.sh
[ "$(id -u)" = 0 ] || { echo "SKIP: not root"; exit 77; }
command -v mpirun >/dev/null || { echo "SKIP: no mpirun"; exit 77; }
command -v tc >/dev/null || { echo "SKIP: no tc"; exit 77; }
# shellcheck disable=SC2154  # bin: the sourcing test's
export PLM_PREFIX=plmt$$ PLM_SUBNET=10.213.$(($$ % 200 + 20)) PARALLM=$bin
export PLM_STATE=/run/$PLM_PREFIX-cluster
if ! ip netns add "$PLM_PREFIX-probe" 2>/dev/null; then echo "SKIP: ip netns unavailable"; exit 77; fi
ip netns del "$PLM_PREFIX-probe"
tmp=$(mktemp -d)
cleanup() { "$S" down >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT
leftovers() {
  { ip netns list; ip -o link show; } | grep -F "$PLM_PREFIX-" || true
}
