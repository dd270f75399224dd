#!/usr/bin/env bash
# Install fabricd on a node: the package (a virtualenv), the fabricd user, the systemd unit, the
# node config and the CurveZMQ keys; then enable and start the service.
#
#   sudo scripts/install.sh --config node-a.toml --keys keys/node-a --datasets /data/corpus
#
# Options:
#   --config FILE     node config to install as /etc/fabricd/fabricd.toml (default: keep the one
#                     there; on a first install, the template config/fabricd.toml; edit node.id)
#   --keys DIR        CurveZMQ keys: DIR/fabricd.key_secret (this node's secret, read only by
#                     systemd: LoadCredential=), DIR/fabricd.key (its public key) and DIR/allowed/*.key
#                     (the public keys allowed in; re-read on `systemctl reload fabricd`).
#                     Without it, and with no key installed yet, a key pair is generated.
#   --datasets DIR    a dataset directory the daemon reads (repeatable): ReadOnlyPaths= in a drop-in
#   --prefix DIR      where the virtualenv goes (default /opt/fabricd)
#   --python EXE      the Python that makes the virtualenv (default python3.11, else python3)
#   --pip-args ARGS   extra pip arguments, e.g. "--no-index --find-links /srv/wheels" offline
#   --no-package      do not (re)install the package (already installed at --prefix)
#   --no-start        install only; do not enable or start the service
#   --root DIR        install into DIR instead of / (a staging tree or an image): implies
#                     --no-start; nothing on the running system is touched (a virtualenv is not
#                     relocatable: use --no-package unless DIR becomes the node's /)
#
# Safe to run again: it upgrades the package, replaces the unit, keeps the config unless --config
# is given, keeps installed keys unless --keys is given, and restarts a running service.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/fabricd
PYTHON=""
CONFIG=""
KEYS=""
DATASETS=()
PIP_ARGS=""
PACKAGE=1
START=1
ROOT=""

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
        --keys) KEYS="${2:?--keys needs a directory}"; shift 2 ;;
        --datasets) DATASETS+=("${2:?--datasets needs a directory}"); shift 2 ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs an executable}"; shift 2 ;;
        --pip-args) PIP_ARGS="${2?--pip-args needs a value}"; shift 2 ;;
        --no-package) PACKAGE=0; shift ;;
        --no-start) START=0; shift ;;
        --root) ROOT="${2:?--root needs a directory}"; START=0; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ -n "$ROOT" ] || [ "$(id -u)" = 0 ] || die "run as root (or with --root DIR to stage an install)"
[ -z "$ROOT" ] || ROOT="$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)"
case "$PREFIX" in /*) ;; *) die "--prefix $PREFIX: must be an absolute path" ;; esac
[ -z "$CONFIG" ] || [ -f "$CONFIG" ] || die "--config $CONFIG: no such file"
[ -z "$KEYS" ] || [ -f "$KEYS/fabricd.key_secret" ] || die "--keys $KEYS: no fabricd.key_secret in it"
for d in "${DATASETS[@]}"; do
    case "$d" in /*) ;; *) die "--datasets $d: must be an absolute path" ;; esac
    case "$d" in *[[:space:]]*) die "--datasets $d: paths with spaces are not supported in ReadOnlyPaths=" ;; esac
    [ -n "$ROOT" ] || [ -d "$d" ] || die "--datasets $d: no such directory"
done

ETC="$ROOT/etc/fabricd"
UNIT_DIR="$ROOT/etc/systemd/system"
VENV="$ROOT$PREFIX"

# --- 1. the package ---------------------------------------------------------------------------
if [ "$PACKAGE" = 1 ]; then
    if [ -z "$PYTHON" ]; then
        PYTHON="$(command -v python3.11 || command -v python3 || true)"
        [ -n "$PYTHON" ] || die "no python3.11 or python3 found; pass --python"
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON: Python 3.11 or newer is needed"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    "$VENV/bin/pip" install --quiet --upgrade $PIP_ARGS "$SRC/client" "$SRC"
    install -m 0644 "$SRC/README.md" "$VENV/README.md"   # the unit's Documentation=
    say "package installed in $PREFIX"
elif [ -z "$ROOT" ]; then
    [ -x "$VENV/bin/fabricd" ] || die "--no-package: $VENV/bin/fabricd is not installed"
fi

# --- 2. the user ------------------------------------------------------------------------------
install -D -m 0644 "$SRC/systemd/fabricd.sysusers" "$ROOT/usr/lib/sysusers.d/fabricd.conf"
if command -v systemd-sysusers >/dev/null; then
    if [ -n "$ROOT" ]; then
        install -d -m 0755 "$ROOT/etc"
        systemd-sysusers --root="$ROOT" fabricd.conf
    else
        systemd-sysusers fabricd.conf
    fi
elif [ -z "$ROOT" ]; then
    getent passwd fabricd >/dev/null || useradd --system --user-group --home-dir /var/lib/fabricd \
        --no-create-home --shell /usr/sbin/nologin --comment "fabricd data-loading fabric daemon" fabricd
else
    die "--root needs systemd-sysusers to create the fabricd user in $ROOT"
fi
if [ -n "$ROOT" ]; then
    FABRICD_GID="$(awk -F: '$1 == "fabricd" {print $3}' "$ROOT/etc/group")"
else
    FABRICD_GID="$(getent group fabricd | cut -d: -f3)"
fi
[ -n "$FABRICD_GID" ] || die "the fabricd group was not created"
# root owns what fabricd only reads; the group lets the daemon read it (numeric: works in --root)
owner() { if [ "$(id -u)" = 0 ]; then chown "$1" "${@:2}"; fi; }

# --- 3. config --------------------------------------------------------------------------------
install -d -m 0750 "$ETC" "$ETC/keys" "$ETC/keys/allowed"
owner "0:$FABRICD_GID" "$ETC" "$ETC/keys" "$ETC/keys/allowed"
if [ -n "$CONFIG" ]; then
    install -m 0640 "$CONFIG" "$ETC/fabricd.toml"
    say "config $CONFIG installed as /etc/fabricd/fabricd.toml"
elif [ ! -f "$ETC/fabricd.toml" ]; then
    install -m 0640 "$SRC/config/fabricd.toml" "$ETC/fabricd.toml"
    say "template config installed: edit /etc/fabricd/fabricd.toml (node.id, cluster peers) before starting"
    START=0
fi
owner "0:$FABRICD_GID" "$ETC/fabricd.toml"

# --- 4. keys ----------------------------------------------------------------------------------
if [ -n "$KEYS" ]; then
    install -m 0600 "$KEYS/fabricd.key_secret" "$ETC/keys/fabricd.key_secret"
    owner 0:0 "$ETC/keys/fabricd.key_secret"
    if [ -f "$KEYS/fabricd.key" ]; then
        install -m 0640 "$KEYS/fabricd.key" "$ETC/keys/fabricd.key"
        owner "0:$FABRICD_GID" "$ETC/keys/fabricd.key"
    fi
    if [ -d "$KEYS/allowed" ]; then
        find "$ETC/keys/allowed" -maxdepth 1 -type f -name '*.key' -delete
        for k in "$KEYS"/allowed/*.key; do
            [ -e "$k" ] || continue
            install -m 0640 "$k" "$ETC/keys/allowed/"
            owner "0:$FABRICD_GID" "$ETC/keys/allowed/$(basename "$k")"
        done
    fi
    say "keys installed from $KEYS"
elif [ ! -f "$ETC/keys/fabricd.key_secret" ]; then
    PY="$VENV/bin/python"
    [ -x "$PY" ] || PY="$(command -v python3 || echo python3)"
    "$PY" -c 'import zmq.auth' 2>/dev/null || die "no key to install (--keys) and $PY has no pyzmq to generate one"
    "$PY" - "$ETC/keys" <<'EOF'
import sys
import zmq.auth
zmq.auth.create_certificates(sys.argv[1], "fabricd")
EOF
    chmod 0600 "$ETC/keys/fabricd.key_secret"
    chmod 0640 "$ETC/keys/fabricd.key"
    owner 0:0 "$ETC/keys/fabricd.key_secret"
    owner "0:$FABRICD_GID" "$ETC/keys/fabricd.key"
    say "generated a key pair; give /etc/fabricd/keys/fabricd.key to the other nodes' allowed/"
fi

# --- 5. the unit ------------------------------------------------------------------------------
install -D -m 0644 "$SRC/systemd/fabricd.service" "$UNIT_DIR/fabricd.service"
DROPIN="$UNIT_DIR/fabricd.service.d"
rm -f "$DROPIN/prefix.conf" "$DROPIN/datasets.conf"
if [ "$PREFIX" != /opt/fabricd ]; then
    install -d -m 0755 "$DROPIN"
    printf '[Service]\nExecStart=\nExecStart=%s/bin/fabricd run --config /etc/fabricd/fabricd.toml\n' \
        "$PREFIX" > "$DROPIN/prefix.conf"
fi
if [ ${#DATASETS[@]} -gt 0 ]; then
    install -d -m 0755 "$DROPIN"
    printf '[Service]\nReadOnlyPaths=%s\n' "${DATASETS[*]}" > "$DROPIN/datasets.conf"
fi
rmdir "$DROPIN" 2>/dev/null || true
say "unit installed as /etc/systemd/system/fabricd.service"

# --- 6. start ---------------------------------------------------------------------------------
if [ -z "$ROOT" ]; then
    systemctl daemon-reload
    if [ "$START" = 1 ]; then
        systemctl enable fabricd.service
        systemctl restart fabricd.service
        say "fabricd started: systemctl status fabricd; journalctl -u fabricd -f"
    else
        say "not started: systemctl enable --now fabricd"
    fi
fi
