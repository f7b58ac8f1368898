#!/usr/bin/env bash
# Installs edge-agent as a systemd service, or removes it.
#
#   scripts/install-service.sh [--prefix DIR] [--now] [--no-enable] [--with-demo-models] [--dry-run]
#   scripts/install-service.sh --uninstall [--purge] [--prefix DIR] [--dry-run]
#
# Install: copies the built app (dist/agent, proto/, production node_modules) into the prefix
# (/opt/edge-agent), creates the edge-agent system user and the data dir /var/lib/edge-agent, installs
# /etc/edge-agent/agent.yaml (never overwriting one that is there) and the unit, then enables it.
# Run `npm ci && npm run build` first. Uninstall removes the app and the unit and keeps the config, the data
# and the user unless --purge.
#
# DESTDIR=/some/root stages the files under that root and skips everything that changes the running system
# (user, ownership, systemctl), listing what it skipped; --dry-run prints every step and changes nothing.
set -euo pipefail

SERVICE=edge-agent
PREFIX=/opt/edge-agent
CONFIG_DIR=/etc/edge-agent
DATA_DIR=/var/lib/edge-agent
UNIT_DIR=/etc/systemd/system
MARKER=.edge-agent-install
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DESTDIR=${DESTDIR:-}
ACTION=install
PURGE=0
DRY_RUN=0
ENABLE=1
START=0
DEMO_MODELS=0

usage() { sed -n '2,15s/^# \{0,1\}//p' "$0"; }
die() { echo "install-service: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#--prefix=}; shift ;;
    --uninstall) ACTION=uninstall; shift ;;
    --purge) PURGE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --no-enable) ENABLE=0; shift ;;
    --now) START=1; shift ;;
    --with-demo-models) DEMO_MODELS=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

case "$PREFIX" in
  /*) ;;
  *) die "--prefix must be an absolute path, got '$PREFIX'" ;;
esac
PREFIX=${PREFIX%/}
case "$PREFIX" in
  ''|/|/usr|/usr/local|/etc|/var|/var/lib|/opt|/home|/root) die "refusing --prefix '$PREFIX': use a directory of its own, e.g. /opt/edge-agent" ;;
esac
if [ "$PURGE" = 1 ] && [ "$ACTION" != uninstall ]; then die "--purge only goes with --uninstall"; fi

# Every change goes through one of these two, so --dry-run and DESTDIR are honoured everywhere.
run() {
  echo "+ $*"
  [ "$DRY_RUN" = 1 ] || "$@"
}
# Steps that change the running system rather than files under DESTDIR.
system() {
  if [ -n "$DESTDIR" ]; then echo "skipped (DESTDIR): $*"; else run "$@"; fi
}
systemd_running() { [ -d /run/systemd/system ]; }

if [ "$DRY_RUN" = 0 ] && [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
  die "must run as root (or set DESTDIR to stage the files, or --dry-run to see the steps)"
fi

APP=$DESTDIR$PREFIX

install_app() {
  [ -f "$SRC/dist/agent/cli.js" ] || die "$SRC/dist/agent/cli.js is missing: run 'npm ci && npm run build' first"
  [ -d "$SRC/node_modules" ] || die "$SRC/node_modules is missing: run 'npm ci' first"
  command -v node >/dev/null || die "node is not on PATH (Node.js >= 20.17 is needed)"
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  [ "$major" -ge 20 ] || die "Node.js $(node -v) is too old: >= 20.17 is needed"
  if [ -e "$APP" ] && [ ! -f "$APP/$MARKER" ] && [ -n "$(ls -A "$APP" 2>/dev/null)" ]; then
    die "$APP exists and was not made by this script: refusing to overwrite it"
  fi

  # Production dependencies only: the paths npm itself resolves for them (nested ones ride along with
  # their parent folder).
  local deps
  deps=$(cd "$SRC" && npm ls --omit=dev --all --parseable 2>/dev/null | sed -n "s|^$SRC/node_modules/||p" | sort -u) || true
  [ -n "$deps" ] || die "could not list the production dependencies (npm ls --omit=dev failed in $SRC)"

  run rm -rf "$APP/dist" "$APP/proto" "$APP/node_modules" "$APP/bin"
  run mkdir -p "$APP/dist" "$APP/bin" "$APP/node_modules"
  run cp -a "$SRC/dist/agent" "$APP/dist/agent"
  run cp -a "$SRC/proto" "$APP/proto"
  run cp "$SRC/package.json" "$APP/package.json"
  for f in package-lock.json README.md LICENSE; do
    if [ -f "$SRC/$f" ]; then run cp "$SRC/$f" "$APP/$f"; fi
  done
  # onnxruntime-node ships binaries for every OS and CPU (~290 MB); this device needs only its own.
  local platform arch excludes=()
  platform=$(node -p process.platform)
  arch=$(node -p process.arch)
  local bin
  for bin in "$SRC"/node_modules/onnxruntime-node/bin/napi-v*/*/ "$SRC"/node_modules/onnxruntime-node/bin/napi-v*/"$platform"/*/; do
    bin=${bin%/}
    case "$bin" in */"$platform"|*/"$platform"/"$arch"|*'*'*) ;; *) excludes+=("--exclude=./${bin#"$SRC"/node_modules/}") ;; esac
  done
  local copied=" " dep parent
  for dep in $deps; do
    case "$dep" in */node_modules/*) continue ;; esac  # inside a parent copied whole
    parent=$(dirname "$dep")
    if [ "$parent" != . ]; then run mkdir -p "$APP/node_modules/$parent"; fi
    if [ "$dep" = onnxruntime-node ]; then
      echo "+ tar -C $SRC/node_modules ${excludes[*]} -c ./$dep | tar -C $APP/node_modules -x"
      if [ "$DRY_RUN" = 0 ]; then tar -C "$SRC/node_modules" "${excludes[@]}" -cf - "./$dep" | tar -C "$APP/node_modules" -xf -; fi
    else
      run cp -a "$SRC/node_modules/$dep" "$APP/node_modules/$dep"
    fi
    copied="$copied$dep "
  done
  run ln -sfn ../dist/agent/cli.js "$APP/bin/$SERVICE"
  run chmod 0755 "$APP/dist/agent/cli.js"
  if [ "$DRY_RUN" = 0 ]; then
    printf 'edge-agent %s installed %s from %s\n' "$(node -p "require('$SRC/package.json').version")" "$(date -u +%FT%TZ)" "$SRC" >"$APP/$MARKER"
    # Every import resolves from the prefix alone: a missing dependency fails here, not at boot.
    node "$APP/bin/$SERVICE" --version >/dev/null || die "the installed app at $APP does not start (node $APP/bin/$SERVICE --version failed)"
  fi
  echo "app: $APP ($(echo "$copied" | wc -w) packages in node_modules)"
}

create_user() {
  local g
  for g in video render; do
    if ! getent group "$g" >/dev/null; then system groupadd --system "$g"; fi
  done
  if ! getent group "$SERVICE" >/dev/null; then system groupadd --system "$SERVICE"; fi
  if ! getent passwd "$SERVICE" >/dev/null; then
    system useradd --system --gid "$SERVICE" --groups video,render --home-dir "$DATA_DIR" --no-create-home \
      --shell /usr/sbin/nologin --comment "edge-agent inference daemon" "$SERVICE"
  fi
}

install_files() {
  run install -d -m 0755 "$DESTDIR$CONFIG_DIR"
  if [ -e "$DESTDIR$CONFIG_DIR/agent.yaml" ]; then
    echo "config: kept $DESTDIR$CONFIG_DIR/agent.yaml (the shipped one is $SRC/edge-config/systemd/agent.yaml)"
  else
    run install -m 0640 "$SRC/edge-config/systemd/agent.yaml" "$DESTDIR$CONFIG_DIR/agent.yaml"
    system chgrp "$SERVICE" "$CONFIG_DIR/agent.yaml"
  fi
  run install -d -m 0750 "$DESTDIR$DATA_DIR" "$DESTDIR$DATA_DIR/models"
  if [ "$DEMO_MODELS" = 1 ]; then
    local m
    for m in "$SRC"/edge-config/models/*/; do
      m=$(basename "$m")
      if [ ! -e "$DESTDIR$DATA_DIR/models/$m" ]; then run cp -a "$SRC/edge-config/models/$m" "$DESTDIR$DATA_DIR/models/$m"; fi
    done
  fi
  system chown -R "$SERVICE:$SERVICE" "$DATA_DIR"
  run install -d -m 0755 "$DESTDIR$UNIT_DIR"
  # bin/edge-agent starts with `#!/usr/bin/env node`: a node outside systemd's default PATH (nvm, a tarball in
  # /opt) is put on the unit's PATH.
  local node_dir path_line=''
  node_dir=$(dirname "$(command -v node)")
  case ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:" in
    *":$node_dir:"*) ;;
    *) path_line="Environment=PATH=$node_dir:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" ;;
  esac
  echo "+ sed 's|/opt/edge-agent|$PREFIX|g' $SRC/edge-config/systemd/$SERVICE.service > $DESTDIR$UNIT_DIR/$SERVICE.service${path_line:+ (adding $path_line)}"
  if [ "$DRY_RUN" = 0 ]; then
    sed -e "s|/opt/edge-agent|$PREFIX|g" ${path_line:+-e "/^Environment=NODE_ENV=/a $path_line"} "$SRC/edge-config/systemd/$SERVICE.service" >"$DESTDIR$UNIT_DIR/$SERVICE.service"
    chmod 0644 "$DESTDIR$UNIT_DIR/$SERVICE.service"
  fi
}

enable_unit() {
  if systemd_running; then system systemctl daemon-reload; fi
  if [ "$ENABLE" = 0 ]; then
    echo "not enabled (--no-enable): systemctl enable --now $SERVICE"
    return
  fi
  if [ "$START" = 1 ] && systemd_running; then
    system systemctl enable --now "$SERVICE.service"
  else
    system systemctl enable "$SERVICE.service"
  fi
}

uninstall() {
  if [ -z "$DESTDIR" ] && systemd_running; then
    system systemctl disable --now "$SERVICE.service" || true
  else
    system systemctl disable "$SERVICE.service" || true
  fi
  run rm -f "$DESTDIR$UNIT_DIR/$SERVICE.service"
  if systemd_running; then system systemctl daemon-reload; fi
  if [ -f "$APP/$MARKER" ]; then
    run rm -rf "$APP"
  elif [ -e "$APP" ]; then
    die "$APP has no $MARKER: not removing a folder this script did not make"
  fi
  if [ "$PURGE" = 1 ]; then
    run rm -rf "$DESTDIR$CONFIG_DIR" "$DESTDIR$DATA_DIR"
    if getent passwd "$SERVICE" >/dev/null; then system userdel "$SERVICE"; fi
    if getent group "$SERVICE" >/dev/null; then system groupdel "$SERVICE"; fi
  else
    echo "kept: $DESTDIR$CONFIG_DIR, $DESTDIR$DATA_DIR and the $SERVICE user (--purge removes them)"
  fi
}

if [ -n "$DESTDIR" ]; then echo "DESTDIR=$DESTDIR: staging files only"; fi
if [ "$DRY_RUN" = 1 ]; then echo "dry run: nothing is changed"; fi
if [ "$ACTION" = install ]; then
  install_app
  create_user
  install_files
  enable_unit
  echo "installed: $SERVICE.service (ExecStart=$PREFIX/bin/$SERVICE serve --config $CONFIG_DIR/agent.yaml)"
else
  uninstall
  echo "uninstalled: $SERVICE.service"
fi
