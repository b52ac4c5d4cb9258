#!/usr/bin/env bash
# Builds .venv from nothing and installs the whole stack; re-running it is quick and changes
# nothing when the inputs (this script, pyproject.toml, requirements/*) are unchanged.
#
#   scripts/setup.sh            # create or update .venv
#   EQLV2_VENV=/path scripts/setup.sh
#
# Every step names itself; the first failing step stops the script with its name.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EQLV2_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3.11}"
STAMP="$VENV/.eqlv2-setup-stamp"

step() { printf '\n[setup] %s (at %d s)\n' "$*" "$SECONDS"; CURRENT_STEP="$*"; }
CURRENT_STEP="start"
trap 'echo "[setup] FAILED at step: $CURRENT_STEP" >&2' ERR

inputs_digest() {
  cat "$ROOT/scripts/setup.sh" "$ROOT/scripts/check_detectron2.py" "$ROOT/pyproject.toml" \
      "$ROOT"/requirements/*.txt | sha256sum | cut -d' ' -f1
}

# System packages of the cluster tests: PostgreSQL (the Optuna study and MLflow's backend store),
# an SSH server, rsync, netcat and acl (`ray up` with the local provider), headless Chromium (the
# MLflow UI test). Checked on every run (cheap); apt-get runs only when one is missing. No
# service is started: the tests start their own, on loopback.
SYSTEM_PACKAGES=(postgresql openssh-server rsync netcat-openbsd acl chromium)
missing_system_packages() {
  local pkg
  for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
  done
}

install_system_packages() (
  local missing=("$@") guard=""
  if [[ "$(id -u)" != 0 ]]; then
    echo "[setup] WARNING: not root, skipping apt-get install ${missing[*]} (the PostgreSQL and" \
         "ray-up tests will be skipped; run 'sudo apt-get install ${missing[*]}')" >&2
    return 0
  fi
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    # Debian starts a package's service on install (sshd on every interface): refuse that for
    # the time of this install only.
    guard=/usr/sbin/policy-rc.d
    trap 'rm -f "$guard"' EXIT
    printf '#!/bin/sh\nexit 101\n' > "$guard" && chmod 755 "$guard"
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
)

if command -v dpkg-query >/dev/null; then
  mapfile -t MISSING < <(missing_system_packages)
  if (( ${#MISSING[@]} )); then
    step "install system packages: ${MISSING[*]} (apt-get)"
    install_system_packages "${MISSING[@]}"
  fi
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(inputs_digest)" && -x "$VENV/bin/python" ]]; then
  echo "[setup] $VENV is up to date (delete $STAMP to force a reinstall)"
  exit 0
fi

step "create virtual environment $VENV"
command -v "$PYTHON_BIN" >/dev/null || { echo "[setup] $PYTHON_BIN not found; set PYTHON=..." >&2; false; }
[[ -x "$VENV/bin/python" ]] || "$PYTHON_BIN" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

step "install uv, the installer of the next steps (requirements/installer.txt)"
"${PIP[@]}" install -q -r "$ROOT/requirements/installer.txt"

# uv reads no pip configuration: hand it the package sources and constraints pip is configured
# with (pip.conf, PIP_* variables), and pip's rule of taking the best version over all indexes.
uv_pip_options() {
  local key value
  while IFS='=' read -r key value; do
    value="${value#\'}"; value="${value%\'}"
    case "${key##*.}" in
      index-url) echo "--index-url=$value" ;;
      extra-index-url) for v in $value; do echo "--extra-index-url=$v"; done ;;
      find-links) for v in $value; do echo "--find-links=$v"; done ;;
      constraint) for v in $value; do echo "--constraint=$v"; done ;;
    esac
  done < <("${PIP[@]}" config list 2>/dev/null)
}
mapfile -t UV_SOURCES < <(uv_pip_options)
UV=("$VENV/bin/uv" pip install --python "$PY" --index-strategy unsafe-best-match --compile-bytecode "${UV_SOURCES[@]}")

step "install torch and torchvision (requirements/torch.txt)"
"${UV[@]}" -r "$ROOT/requirements/torch.txt"

step "install detectron2 0.7.2 wheel, pinned by sha256 (requirements/detectron2.txt)"
if ! "$PY" -c 'import detectron2, sys; sys.exit(detectron2.__version__ != "0.7.2")' 2>/dev/null; then
  "${PIP[@]}" install --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
    --platform linux_x86_64 --upgrade --target "$SITE" --require-hashes \
    -r "$ROOT/requirements/detectron2.txt"
fi

step "install eqlv2 (editable) with the cluster and dev extras, constrained by requirements/constraints.txt"
"${UV[@]}" -c "$ROOT/requirements/constraints.txt" -e "$ROOT[cluster,dev]"

step "check detectron2 version and a Mask R-CNN forward"
"$PY" "$ROOT/scripts/check_detectron2.py"

step "check installed requirements (pip check, known exceptions in requirements/pip-check-allowed.txt)"
"$PY" "$ROOT/scripts/pip_check.py" "$ROOT/requirements/pip-check-allowed.txt"

inputs_digest > "$STAMP"
echo "[setup] done in $SECONDS s: activate with 'source $VENV/bin/activate'"
