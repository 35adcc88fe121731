#!/usr/bin/env bash
# Installs the given Debian packages where missing, and marks each of them manually installed, so
# that `apt-get autoremove` cannot take away one that only came in as another package's dependency
# (e.g. googletest pulled in by libgtest-dev). Idempotent: does nothing when all are installed and
# marked. Usage: bash scripts/install-packages.sh PACKAGE...
set -euo pipefail
[ $# -gt 0 ] || exit 0

todo=()
auto=" $(apt-mark showauto 2>/dev/null | tr '\n' ' ') "
for p in "$@"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    todo+=("$p")  # missing
  elif [[ "$auto" == *" $p "* ]]; then
    todo+=("$p")  # present only as a dependency: installing it by name marks it manual
  fi
done
[ ${#todo[@]} -gt 0 ] || exit 0

echo "install-packages: installing (or marking manual) ${todo[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${todo[@]}"
