# Sourced by scripts/demo and scripts/test: makes sure .venv exists and has fabricd installed.
# Needs only Python >= 3.11 on the machine; everything else comes from the package index.
# FABRICD_EXTRAS: the extras of fabricd to install (default "test"; scripts/test asks for
# "test,train", which adds PyTorch for the training example's test).
set -euo pipefail
FABRICD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$FABRICD_ROOT/.venv"
STAMP="$VENV/.fabricd-installed"
FABRICD_EXTRAS="${FABRICD_EXTRAS:-test}"

_find_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "fabricd needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

_needs_install() {
  [ -x "$VENV/bin/python" ] || return 0
  [ -f "$STAMP" ] || return 0
  # the planner's C loops are built by the install (in place, for this editable one): a changed
  # source installs again, or the old build would run
  for f in "$FABRICD_ROOT/pyproject.toml" "$FABRICD_ROOT/client/pyproject.toml" "$FABRICD_ROOT/setup.py" \
           "$FABRICD_ROOT/fabricd/planner/_native.c"; do
    [ "$f" -nt "$STAMP" ] && return 0
  done
  # the stamp lists the extras installed, one a line; asking for one not among them installs again
  for extra in ${FABRICD_EXTRAS//,/ }; do
    grep -qxF "$extra" "$STAMP" || return 0
  done
  return 1
}

if _needs_install; then
  py="$(_find_python)"
  echo "bootstrapping $VENV with $($py --version 2>&1) (first run only) ..." >&2
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  log="$VENV/bootstrap.log"
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         "$VENV/bin/python" -m pip install --disable-pip-version-check \
             -e "$FABRICD_ROOT/client" -e "$FABRICD_ROOT[$FABRICD_EXTRAS]"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "bootstrap failed; full log: $log" >&2
    exit 1
  fi
  tr ',' '\n' <<<"$FABRICD_EXTRAS" >"$STAMP"
  echo "bootstrapped; install log: $log" >&2
fi
export PATH="$VENV/bin:$PATH"
