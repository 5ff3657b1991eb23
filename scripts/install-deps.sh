#!/usr/bin/env bash
# Installs the Debian packages mongocast needs to build, test and run its demo
# (see README.md). Idempotent: packages already present are not touched, and
# nothing runs apt at all when everything is there. Uses sudo when not root.
#
#   scripts/install-deps.sh            build + test dependencies
#   scripts/install-deps.sh --browser  also Chromium (viewer-page tests)
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  libbson-dev libmongoc-dev libuv1-dev node-llhttp libssl-dev
  libhiredis-dev libcurl4-openssl-dev libnats-dev libyaml-dev libpcre2-dev liburing-dev
  libcmocka-dev clang libclang-rt-14-dev
  python3 python3-pytest python3-pymongo python3-websockets python3-redis
  python3-jwt python3-requests
  redis-server nats-server
  openssl  # the CLI: the TLS tests make their test CA and certificates with it
)
for arg in "$@"; do
  case "$arg" in
    --browser) packages+=(chromium) ;;
    *) echo "install-deps: unknown option $arg" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
