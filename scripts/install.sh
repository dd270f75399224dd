#!/usr/bin/env bash
# Install fabricd on a node: the package (a virtualenv), the fabricd user, the systemd unit, the
# node config and the CurveZMQ keys; then enable and start the service.
#
#   sudo scripts/install.sh --config node-a.toml --keys fabric-keys --datasets /data/corpus
#
# Options:
#   --config FILE     node config to install as /etc/fabricd/fabricd.toml (default: keep the one
#                     there; on a first install, the template config/fabricd.toml; edit node.id)
#   --keys DIR        the fabric keys directory (made with `fabricctl keys generate --dir DIR
#                     server`, `... node ID...`, `... trainer NAME`, `... operator NAME`). Installed
#                     in /etc/fabricd/keys: server.key (0640 root:fabricd), server.key_secret and
#                     node.key_secret (this node's DIR/nodes/ID.key_secret), both 0600 root (systemd
#                     hands them to the daemon: LoadCredential=), and the public keys nodes/*.key,
#                     trainers/*.key, operators/*.key (the allow-lists; replaced wholesale, so a key
#                     removed from DIR is removed here; trainer and operator secrets never are).
#                     Without it, and with no keys installed yet: a fabric of one node, its server
#                     key and node key generated here (add trainers and operators with `fabricctl
#                     keys generate --dir /etc/fabricd/keys trainer NAME`, `systemctl reload fabricd`)
#   --node ID         this node's id, to pick its key (default: node.id of the config)
#   --datasets DIR    a dataset directory the daemon reads (repeatable): ReadOnlyPaths= in a drop-in
#   --trainer-group G the group of the trainers' users on this node: a drop-in makes the daemon
#                     join it (SupplementaryGroups=) and makes /run/fabricd/trainers (setgid G) at
#                     each start, so that with `[security] trainer_group = "G"` in the config it
#                     shares its trainer-stream Unix sockets with that group (README: Security);
#                     the group must exist
#   --prefix DIR      where the virtualenv goes (default /opt/fabricd)
#   --python EXE      the Python that makes the virtualenv (default python3.11, else python3); with
#                     --no-package and no virtualenv, the one that reads node.id and makes keys
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
NODE=""
DATASETS=()
TRAINER_GROUP=""
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
        --node) NODE="${2:?--node needs a node id}"; shift 2 ;;
        --datasets) DATASETS+=("${2:?--datasets needs a directory}"); shift 2 ;;
        --trainer-group) TRAINER_GROUP="${2:?--trainer-group needs a group}"; shift 2 ;;
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
[ -z "$KEYS" ] || [ -d "$KEYS" ] || die "--keys $KEYS: no such directory"
for d in "${DATASETS[@]}"; do
    case "$d" in /*) ;; *) die "--datasets $d: must be an absolute path" ;; esac
    case "$d" in *[[:space:]]*) die "--datasets $d: paths with spaces are not supported in ReadOnlyPaths=" ;; esac
    [ -n "$ROOT" ] || [ -d "$d" ] || die "--datasets $d: no such directory"
done
if [ -n "$TRAINER_GROUP" ]; then
    case "$TRAINER_GROUP" in *[!a-zA-Z0-9_.-]*|-*) die "--trainer-group $TRAINER_GROUP: not a group name" ;; esac
    [ -n "$ROOT" ] || getent group "$TRAINER_GROUP" >/dev/null || die "--trainer-group $TRAINER_GROUP: no such group"
fi

ETC="$ROOT/etc/fabricd"
UNIT_DIR="$ROOT/etc/systemd/system"
VENV="$ROOT$PREFIX"
KEYS_ETC="$ETC/keys"

# --- 0. which node, which keys: decided before anything is installed ---------------------------
# The first Python that imports module $1: the virtualenv's, --python's, the system's; or none.
python_with() {
    local py
    for py in "$VENV/bin/python" "$PYTHON" python3.11 python3; do
        if [ -n "$py" ] && command -v "$py" >/dev/null && "$py" -c "import $1" 2>/dev/null; then
            echo "$py"; return
        fi
    done
}

# The config the daemon will read: --config, else the installed one, else (none) the template.
CFG_SRC="$CONFIG"
[ -n "$CFG_SRC" ] || [ ! -f "$ETC/fabricd.toml" ] || CFG_SRC="$ETC/fabricd.toml"
CFG_ID=""
NODE_WHY="no config is installed yet: pass --config FILE or --node ID"
if [ -n "$CFG_SRC" ]; then
    TOML_PY="$(python_with tomllib)"
    NODE_WHY="cannot read node.id from $CFG_SRC (no Python 3.11+ with tomllib here): pass --node ID"
    if [ -n "$TOML_PY" ]; then
        CFG_LINE="$("$TOML_PY" - "$CFG_SRC" <<'EOF'
import os, sys, tomllib
path = sys.argv[1]
try:
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
except (OSError, tomllib.TOMLDecodeError) as e:
    sys.exit(f"install.sh: {path}: not a readable TOML config: {e}")
node = cfg.get("node") if isinstance(cfg.get("node"), dict) else {}
sec = cfg.get("security") if isinstance(cfg.get("security"), dict) else {}
node_id = node.get("id") if isinstance(node.get("id"), str) else ""
keys_dir = os.path.normpath(os.path.join("/etc/fabricd", str(sec.get("keys_dir", "/etc/fabricd/keys"))))
print(node_id, keys_dir, "insecure" if sec.get("insecure") is True else "secure", sep="\t")
EOF
)" || exit 1
        IFS=$'\t' read -r CFG_ID CFG_KEYS_DIR CFG_SECURITY <<<"$CFG_LINE"
        NODE_WHY="$CFG_SRC has no node.id: set it, or pass --node ID"
        if [ "$CFG_KEYS_DIR" != /etc/fabricd/keys ]; then
            say "warning: $CFG_SRC sets security.keys_dir = $CFG_KEYS_DIR, but keys are installed in" \
                "/etc/fabricd/keys (where the unit's LoadCredential= reads the secrets)"
        fi
        [ "$CFG_SECURITY" = secure ] || say "warning: $CFG_SRC sets security.insecure = true: the daemon ignores its keys"
    fi
fi
NODE_ID="${NODE:-$CFG_ID}"
if [ -n "$NODE" ] && [ -n "$CFG_ID" ] && [ "$NODE" != "$CFG_ID" ]; then
    say "warning: --node $NODE, but $CFG_SRC says node.id = \"$CFG_ID\" (the daemon uses that one)"
fi
[ -z "$NODE_ID" ] || [[ "$NODE_ID" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ ]] \
    || die "node id \"$NODE_ID\": expected 1-128 of A-Z a-z 0-9 . _ - (starting with a letter or digit)"
need_node() { [ -n "$NODE_ID" ] || die "$1: which node? $NODE_WHY"; }
KEYS_PY="$(python_with fabric_client.keys)"   # checks keys (and makes them); none: not checked

if [ -n "$KEYS" ]; then
    need_node "--keys $KEYS"
    for f in server.key server.key_secret; do
        [ -f "$KEYS/$f" ] || die "--keys $KEYS: no $f in it (a fabric keys directory has the server key:" \
            "fabricctl keys generate --dir $KEYS server)"
    done
    for f in "nodes/$NODE_ID.key_secret" "nodes/$NODE_ID.key"; do
        [ -f "$KEYS/$f" ] || die "--keys $KEYS: no $f in it: no key for this node ($NODE_ID) (make it with" \
            "fabricctl keys generate --dir $KEYS node $NODE_ID, or pass --node ID)"
    done
    KEY_ACTION=install
elif [ -e "$KEYS_ETC/server.key_secret" ] || [ -e "$KEYS_ETC/node.key_secret" ]; then
    for f in server.key server.key_secret node.key_secret; do
        [ -f "$KEYS_ETC/$f" ] || die "/etc/fabricd/keys: incomplete (no $f): install the keys with --keys DIR"
    done
    if [ -n "$NODE_ID" ]; then
        [ -f "$KEYS_ETC/nodes/$NODE_ID.key" ] || die "/etc/fabricd/keys has no nodes/$NODE_ID.key: the keys" \
            "installed are not node $NODE_ID's; install its keys with --keys DIR"
    fi
    KEY_ACTION=keep
elif [ -z "$NODE_ID" ] && [ -z "$CFG_SRC" ]; then
    KEY_ACTION=later   # the template config: its node.id is a placeholder
else
    need_node "no keys installed and no --keys DIR"
    [ -n "$KEYS_PY" ] || [ "$PACKAGE" = 1 ] || die "no keys installed and no --keys DIR, and no Python here" \
        "imports fabric_client to generate them (install the package, pass --python, or pass --keys DIR)"
    KEY_ACTION=generate
fi

# Check a keys tree as the daemon will read it (KeyRing, the secrets as systemd credentials).
check_keys() {  # dir, what to call it in an error
    if [ -z "$KEYS_PY" ] || [ -z "$NODE_ID" ]; then
        say "keys not checked (no node id, or no Python here imports fabric_client)"; return
    fi
    "$KEYS_PY" - "$1" "$NODE_ID" "$2" <<'EOF'
import sys
from fabric_client.keys import KeyRing, KeysError
keys_dir, node_id, what = sys.argv[1:]
try:
    counts = KeyRing(keys_dir, node_id, credentials=keys_dir).reload()
except KeysError as e:
    sys.exit(f"install.sh: {what}: {e}")
print(f"install.sh: keys of node {node_id}: allow-lists of " + ", ".join(f"{n} {k}(s)" for k, n in counts.items()))
EOF
}
KEYS_CHECKED=0
if [ "$KEY_ACTION" = keep ] && [ -n "$KEYS_PY" ]; then
    check_keys "$KEYS_ETC" "/etc/fabricd/keys" || exit 1
    KEYS_CHECKED=1
fi

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
    say "package installed in $PREFIX (planner: $("$VENV/bin/python" -c 'from fabricd.planner import native; print(native.describe())'))"
elif [ -z "$ROOT" ]; then
    [ -x "$VENV/bin/fabricd" ] || die "--no-package: $VENV/bin/fabricd is not installed"
fi
[ -n "$KEYS_PY" ] || KEYS_PY="$(python_with fabric_client.keys)"   # the virtualenv made just now
[ -n "$KEYS_PY" ] || [ "$KEY_ACTION" != generate ] || die "$VENV/bin/python cannot import fabric_client to generate keys"

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
install -d -m 0750 "$ETC"
owner "0:$FABRICD_GID" "$ETC"
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
# A new keys tree is made next to the installed one, checked, then swapped in whole: a key removed
# from --keys DIR disappears, and a failed install leaves the old keys as they were.
if [ "$KEY_ACTION" = install ] || [ "$KEY_ACTION" = generate ]; then
    STAGE="$ETC/keys.new"
    rm -rf "$STAGE" "$ETC/keys.old"
    trap 'rm -rf "$STAGE"' EXIT
    install -d -m 0750 "$STAGE" "$STAGE/nodes" "$STAGE/trainers" "$STAGE/operators"
    if [ "$KEY_ACTION" = install ]; then
        install -m 0640 "$KEYS/server.key" "$STAGE/server.key"
        install -m 0600 "$KEYS/server.key_secret" "$STAGE/server.key_secret"
        install -m 0600 "$KEYS/nodes/$NODE_ID.key_secret" "$STAGE/node.key_secret"
        for sub in nodes trainers operators; do      # public keys only: *.key, never *.key_secret
            for k in "$KEYS/$sub"/*.key; do
                [ -f "$k" ] || continue
                install -m 0640 "$k" "$STAGE/$sub/"
            done
        done
    else
        "$KEYS_PY" - "$STAGE" "$NODE_ID" <<'EOF'
import sys
from fabric_client.keys import KeysError, generate
try:
    generate(sys.argv[1], "server")
    generate(sys.argv[1], "node", sys.argv[2])
except KeysError as e:
    sys.exit(f"install.sh: {e}")
EOF
        mv "$STAGE/nodes/$NODE_ID.key_secret" "$STAGE/node.key_secret"
        chmod 0600 "$STAGE/server.key_secret" "$STAGE/node.key_secret"
        chmod 0640 "$STAGE/server.key" "$STAGE/nodes/$NODE_ID.key"
    fi
    if [ "$(id -u)" = 0 ]; then
        chown -R "0:$FABRICD_GID" "$STAGE"
        chown 0:0 "$STAGE/server.key_secret" "$STAGE/node.key_secret"
    fi
    check_keys "$STAGE" "${KEYS:-generated keys}" || exit 1
    [ ! -e "$KEYS_ETC" ] || mv "$KEYS_ETC" "$ETC/keys.old"
    mv "$STAGE" "$KEYS_ETC"
    rm -rf "$ETC/keys.old"
    trap - EXIT
    if [ "$KEY_ACTION" = install ]; then
        say "keys installed from $KEYS (node $NODE_ID) in /etc/fabricd/keys"
    else
        say "generated a fabric of one node: /etc/fabricd/keys/server.key and nodes/$NODE_ID.key;" \
            "add a trainer or an operator with: fabricctl keys generate --dir /etc/fabricd/keys trainer NAME" \
            "(or operator NAME), then systemctl reload fabricd; give it its NAME.key_secret and server.key"
    fi
elif [ "$KEY_ACTION" = later ]; then
    say "no keys yet: set node.id in /etc/fabricd/fabricd.toml, then run install.sh again (it generates" \
        "them), or pass --keys DIR"
else
    [ "$KEYS_CHECKED" = 1 ] || check_keys "$KEYS_ETC" "/etc/fabricd/keys" || exit 1
    say "keys kept in /etc/fabricd/keys"
fi

# --- 5. the unit ------------------------------------------------------------------------------
install -D -m 0644 "$SRC/systemd/fabricd.service" "$UNIT_DIR/fabricd.service"
DROPIN="$UNIT_DIR/fabricd.service.d"
rm -f "$DROPIN/prefix.conf" "$DROPIN/datasets.conf" "$DROPIN/trainers.conf"
if [ "$PREFIX" != /opt/fabricd ]; then
    install -d -m 0755 "$DROPIN"
    printf '[Service]\nExecStart=\nExecStart=%s/bin/fabricd run --config /etc/fabricd/fabricd.toml\n' \
        "$PREFIX" > "$DROPIN/prefix.conf"
fi
if [ ${#DATASETS[@]} -gt 0 ]; then
    install -d -m 0755 "$DROPIN"
    printf '[Service]\nReadOnlyPaths=%s\n' "${DATASETS[*]}" > "$DROPIN/datasets.conf"
fi
if [ -n "$TRAINER_GROUP" ]; then
    install -d -m 0755 "$DROPIN"
    # the daemon joins the group, and root (the + prefix: no sandbox) makes the directory its
    # trainer sockets go in, setgid to the group: under the unit's system call filter the daemon
    # itself may not chown (README: Security)
    printf '[Service]\nSupplementaryGroups=%s\nExecStartPre=+/usr/bin/install -d -m 2750 -o fabricd -g %s /run/fabricd/trainers\n' \
        "$TRAINER_GROUP" "$TRAINER_GROUP" > "$DROPIN/trainers.conf"
    say "the daemon joins group $TRAINER_GROUP: set [security] trainer_group = \"$TRAINER_GROUP\" in /etc/fabricd/fabricd.toml"
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
