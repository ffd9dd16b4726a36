#!/usr/bin/env bash
# Loopback "remote GPU host" test bed for the test suite and CI.
#
# It stands in for the real GPU box the pipeline reaches over SSH:
#   * sshd (as root) on 127.0.0.1:$COSMOS_TESTBED_SSH_PORT with its own keys and config, used by
#     Airflow's SSHHook/SFTP, and by the docker SDK's ssh transport, which runs
#     `docker system dial-stdio` on the "remote" host;
#   * a Docker-API engine for that `dial-stdio`: podman's API service on a unix socket in the state
#     dir (sshd's SetEnv hands DOCKER_HOST to every remote session);
#   * a local base image localhost/cosmos-upsampler-base:bookworm built with debootstrap, because no
#     container registry is reachable from here.
#
# Usage: scripts/testbed.sh up|down|status|env
#   up      install what is missing and start everything; idempotent, a second `up` only checks.
#   down    stop containers, the podman service and sshd, remove the ~/.ssh blocks `up` wrote.
#           Keys, image storage and the rootfs tarball stay in the state dir, so the next `up` is
#           quick; `rm -rf` the state dir after `down` for a clean slate.
#   status  report what is running; exit 0 only when everything is up.
#   env     print the shell-sourceable <state>/env (written by `up`).
#
# Settings (environment): COSMOS_TESTBED_DIR (default /var/tmp/cosmos-testbed),
# COSMOS_TESTBED_SSH_PORT (default 2222), COSMOS_TESTBED_MIRROR (Debian mirror for debootstrap;
# default: the one in /etc/apt/sources.list*).
#
# Needs root on Debian 12 (it runs apt-get, sshd, podman as root and writes ~/.ssh).
set -euo pipefail

STATE="${COSMOS_TESTBED_DIR:-/var/tmp/cosmos-testbed}"
SSH_HOST=127.0.0.1
SSH_PORT="${COSMOS_TESTBED_SSH_PORT:-2222}"
SSH_USER=root
IMAGE=localhost/cosmos-upsampler-base:bookworm
SUITE=bookworm
# Runtime needs of the upsampler image: Python 3.11 (same as the host, so wheels built here,
# e.g. llama-cpp-python for cp311, install as they are), venv/pip to install them, CA certs,
# and libgomp1/libstdc++6 for llama.cpp's OpenMP/C++ runtime.
BASE_PACKAGES="python3,python3-venv,python3-pip,ca-certificates,libgomp1,libstdc++6"
APT_PACKAGES=(openssh-server openssh-client podman runc debootstrap ffmpeg curl ca-certificates)

SSH_STATE="$STATE/ssh"
HOST_KEY="$SSH_STATE/ssh_host_ed25519_key"
USER_KEY="$SSH_STATE/id_ed25519"
AUTHORIZED_KEYS="$SSH_STATE/authorized_keys"
KNOWN_HOSTS="$SSH_STATE/known_hosts"
SSHD_CONFIG="$SSH_STATE/sshd_config"
SSHD_PID="$SSH_STATE/sshd.pid"
SSHD_LOG="$SSH_STATE/sshd.log"

PODMAN_STATE="$STATE/podman"
PODMAN_SOCK="$STATE/podman.sock"
PODMAN_PID="$PODMAN_STATE/service.pid"
PODMAN_LOG="$PODMAN_STATE/service.log"
DOCKER_HOST_URL="unix://$PODMAN_SOCK"
CACHE="$STATE/cache"
ENV_FILE="$STATE/env"

# podman must see these from its very first invocation: podman records graphroot/runroot in its
# database on first use, and a later mismatch makes every container wait time out. Exported here,
# before any podman call, and handed to remote sessions through sshd's SetEnv.
export CONTAINERS_CONF="$PODMAN_STATE/containers.conf"
export CONTAINERS_STORAGE_CONF="$PODMAN_STATE/storage.conf"

# The docker SDK's paramiko transport (docker_url="ssh://root@127.0.0.1:PORT") takes no key or
# host key arguments: it reads IdentityFile from ~/.ssh/config (a Host block matching the URL's
# host name) and checks the host key against ~/.ssh/known_hosts with paramiko's RejectPolicy.
# So `up` writes one marked block into each file (replacing its own earlier block) and `down`
# removes it. Other content of those files is left alone.
USER_SSH_DIR="${HOME:-/root}/.ssh"
# Markers name the state dir (not the port), so `up` on another port replaces the old block.
BLOCK_BEGIN="# >>> cosmos-testbed $STATE (written by scripts/testbed.sh up; removed by down) >>>"
BLOCK_END="# <<< cosmos-testbed $STATE <<<"

log() { printf '[testbed] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Write $2 to file $1 only when it differs; return 0 when the file changed.
write_if_changed() {
    local file=$1 content=$2
    if [[ -f $file ]] && [[ "$(cat "$file")" == "$content" ]]; then
        return 1
    fi
    printf '%s\n' "$content" >"$file.tmp"
    mv -f "$file.tmp" "$file"
    return 0
}

# Replace our marked block in $1 with $2 (or just remove it when $2 is empty), keeping the
# file's inode, mode and other lines.
replace_block() {
    local file=$1 content=$2 tmp
    mkdir -p "$(dirname "$file")"
    chmod 700 "$(dirname "$file")"
    [[ -e $file ]] || { : >"$file"; chmod 600 "$file"; }
    tmp=$(mktemp)
    awk -v b="$BLOCK_BEGIN" -v e="$BLOCK_END" '$0 == b {skip = 1; next} $0 == e {skip = 0; next} !skip' \
        "$file" >"$tmp"
    if [[ -n $content ]]; then
        printf '%s\n%s\n%s\n' "$BLOCK_BEGIN" "$content" "$BLOCK_END" >>"$tmp"
    fi
    cmp -s "$tmp" "$file" || cat "$tmp" >"$file"
    rm -f "$tmp"
}

pid_alive() {  # pid file, expected substring of the command line
    local pid
    [[ -s $1 ]] || return 1
    pid=$(cat "$1")
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$2"
}

stop_pid() {  # pid file, expected substring of the command line, name
    local pid
    if pid_alive "$1" "$2"; then
        pid=$(cat "$1")
        log "stopping $3 (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        if [[ -d /proc/$pid ]]; then
            log "$3 ignored SIGTERM; sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$1"
}

port_open() { (exec 3<>"/dev/tcp/$SSH_HOST/$SSH_PORT") 2>/dev/null; }

podman_ping() { curl -fsS --max-time 2 --unix-socket "$PODMAN_SOCK" http://d/_ping >/dev/null 2>&1; }

# --- 1. packages --------------------------------------------------------------------------------

ensure_packages() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "installing apt packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
    fi
    ensure_docker_cli
}

# `docker system dial-stdio` (run on the "remote" side by the docker SDK) needs only the docker
# CLI. Debian 12 has no client-only package (docker.io also brings dockerd and containerd, and its
# postinst tries to start them), so take just /usr/bin/docker out of docker.io's .deb.
ensure_docker_cli() {
    command -v docker >/dev/null && return 0
    local tmp
    log "no docker CLI: extracting /usr/bin/docker from Debian's docker.io package"
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true  # apt downloads as _apt (else it warns, as root)
    (cd "$tmp" && apt-get download -qq docker.io)
    dpkg-deb --fsys-tarfile "$tmp"/docker.io_*.deb | tar -x -C "$tmp" ./usr/bin/docker
    install -m 755 "$tmp/usr/bin/docker" /usr/local/bin/docker
    rm -rf "$tmp"
    docker system dial-stdio --help >/dev/null
}

# --- 2. sshd ------------------------------------------------------------------------------------

ensure_keys() {
    mkdir -p "$SSH_STATE"
    chmod 700 "$SSH_STATE"
    [[ -f $HOST_KEY ]] || ssh-keygen -q -t ed25519 -N '' -C cosmos-testbed-host -f "$HOST_KEY"
    [[ -f $USER_KEY ]] || ssh-keygen -q -t ed25519 -N '' -C cosmos-testbed-user -f "$USER_KEY"
    write_if_changed "$AUTHORIZED_KEYS" "$(cat "$USER_KEY.pub")" || true
    # "[host]:port ssh-ed25519 AAAA..." is the form both OpenSSH and paramiko look up for a
    # non-22 port.
    write_if_changed "$KNOWN_HOSTS" "[$SSH_HOST]:$SSH_PORT $(host_key_line)" || true
}

host_key_line() { cut -d' ' -f1,2 "$HOST_KEY.pub"; }  # "ssh-ed25519 AAAA..." without the comment

ensure_sshd() {
    local config changed=0
    config="# Generated by scripts/testbed.sh; rewritten by every 'up'.
Port $SSH_PORT
ListenAddress $SSH_HOST
HostKey $HOST_KEY
PidFile $SSHD_PID
AuthorizedKeysFile $AUTHORIZED_KEYS
PermitRootLogin prohibit-password
AllowUsers $SSH_USER
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# No PAM session here (no systemd/logind); StrictModes off because the state dir may be anywhere.
UsePAM no
StrictModes no
PrintMotd no
Subsystem sftp internal-sftp
# Every remote session (ssh commands, docker dial-stdio) talks to this test bed's podman.
SetEnv DOCKER_HOST=$DOCKER_HOST_URL CONTAINERS_CONF=$CONTAINERS_CONF CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF
# The docker SDK opens one channel per pooled HTTP connection, and tests may run in parallel.
MaxSessions 64
MaxStartups 64:30:128"
    write_if_changed "$SSHD_CONFIG" "$config" && changed=1
    mkdir -p /run/sshd  # privilege separation dir, normally made by the ssh service; -t needs it too
    chmod 755 /run/sshd
    /usr/sbin/sshd -t -f "$SSHD_CONFIG" || die "sshd rejected $SSHD_CONFIG"

    if pid_alive "$SSHD_PID" "$SSHD_CONFIG"; then
        ((changed)) || return 0
        stop_pid "$SSHD_PID" "$SSHD_CONFIG" "sshd (config changed)"
    fi
    port_open && die "port $SSH_HOST:$SSH_PORT is taken by another process; set COSMOS_TESTBED_SSH_PORT"
    log "starting sshd on $SSH_HOST:$SSH_PORT"
    # sshd needs an absolute path (it re-executes itself) and daemonizes on its own.
    /usr/sbin/sshd -f "$SSHD_CONFIG" -E "$SSHD_LOG" 9>&-
    for _ in $(seq 50); do
        pid_alive "$SSHD_PID" "$SSHD_CONFIG" && port_open && return 0
        sleep 0.1
    done
    die "sshd did not come up; see $SSHD_LOG"
}

# --- 3. podman ----------------------------------------------------------------------------------

write_podman_conf() {
    mkdir -p "$PODMAN_STATE"
    # runc, not crun: crun fails here (setrlimit, cgroup v1/v2 hybrid). cgroupfs and file events:
    # there is no systemd/journald. Everything podman keeps on disk lives in the state dir, so this
    # test bed never shares (or collides with) the machine's default /var/lib/containers.
    write_if_changed "$CONTAINERS_CONF" "# Generated by scripts/testbed.sh.
[containers]
default_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]
log_driver = \"k8s-file\"

[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"
tmp_dir = \"$PODMAN_STATE/run/libpod\"
volume_path = \"$PODMAN_STATE/volumes\"

[network]
network_config_dir = \"$PODMAN_STATE/networks\"" || true
    write_if_changed "$CONTAINERS_STORAGE_CONF" "# Generated by scripts/testbed.sh.
[storage]
driver = \"overlay\"
graphroot = \"$PODMAN_STATE/storage\"
runroot = \"$PODMAN_STATE/run/storage\"" || true
}

ensure_podman() {
    local boot_id
    write_podman_conf
    pid_alive "$PODMAN_PID" "$PODMAN_SOCK" && podman_ping && return 0
    stop_pid "$PODMAN_PID" "$PODMAN_SOCK" "unresponsive podman service"

    # runroot/tmp_dir hold runtime state (mounts, locks, the "alive" marker) that is stale after
    # a reboot; since they are not on a tmpfs here, drop them when the boot id changed.
    boot_id=$(cat /proc/sys/kernel/random/boot_id)
    if [[ -f $PODMAN_STATE/boot_id && "$(cat "$PODMAN_STATE/boot_id")" != "$boot_id" ]]; then
        log "machine rebooted since the last 'up': clearing podman runtime state"
        rm -rf --one-file-system "$PODMAN_STATE/run"
    fi
    echo "$boot_id" >"$PODMAN_STATE/boot_id"

    rm -f "$PODMAN_SOCK"
    log "starting podman system service on $PODMAN_SOCK"
    # Started from /: the service outlives this script, and conmon, which it starts for every container, needs the
    # service's working directory; started in a clone deleted later, every container start failed with "write
    # child: broken pipe" (conmon: "Failed to get working directory").
    (cd / && exec setsid podman system service --time=0 "unix://$PODMAN_SOCK" \
        </dev/null >>"$PODMAN_LOG" 2>&1 9>&-) &
    echo $! >"$PODMAN_PID"
    for _ in $(seq 150); do
        podman_ping && return 0
        pid_alive "$PODMAN_PID" "$PODMAN_SOCK" || break
        sleep 0.2
    done
    tail -n 20 "$PODMAN_LOG" >&2 || true
    die "podman service did not answer on $PODMAN_SOCK; see $PODMAN_LOG"
}

# --- 4. base image ------------------------------------------------------------------------------

debian_mirror() {
    if [[ -n ${COSMOS_TESTBED_MIRROR:-} ]]; then
        echo "$COSMOS_TESTBED_MIRROR"
        return
    fi
    # The first main-archive (not -security) Debian URL the machine's apt uses, from either
    # one-line or deb822 sources.
    local url
    url=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n 1 |
        tr -d ' ' || true)
    if [[ -z $url ]]; then
        # No guessed public mirror: this machine may reach only its own package source.
        echo "testbed: no Debian archive URL found in /etc/apt/sources.list*; set COSMOS_TESTBED_MIRROR to the" \
            "Debian mirror this machine's apt uses (e.g. http://HOST/debian)" >&2
        return 1
    fi
    echo "$url"
}

ensure_image() {
    local key tarball partial mirror
    podman image exists "$IMAGE" && return 0
    mkdir -p "$CACHE"
    # The tarball name carries a hash of what goes into it, so changing BASE_PACKAGES rebuilds.
    key=$(printf '%s %s' "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
    tarball="$CACHE/rootfs-$SUITE-$key.tar"
    if [[ ! -f $tarball ]]; then
        mirror=$(debian_mirror)
        partial="$CACHE/rootfs.partial"
        # --one-file-system: never follow a mount (/proc, /dev) left by an interrupted debootstrap.
        rm -rf --one-file-system "$partial"
        log "debootstrap $SUITE (minbase + $BASE_PACKAGES) from $mirror; takes a few minutes"
        debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$partial" "$mirror" \
            >"$CACHE/debootstrap.log" 2>&1 || {
            tail -n 30 "$CACHE/debootstrap.log" >&2
            die "debootstrap failed; see $CACHE/debootstrap.log"
        }
        chroot "$partial" apt-get clean
        rm -rf "${partial:?}"/var/lib/apt/lists/* "${partial:?}"/var/cache/apt/*.bin
        tar --numeric-owner -C "$partial" -cf "$tarball.partial" .
        mv -f "$tarball.partial" "$tarball"
        rm -rf --one-file-system "$partial"
    fi
    log "importing $tarball as $IMAGE"
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap $SUITE minbase + $BASE_PACKAGES (scripts/testbed.sh)" \
        "$tarball" "$IMAGE" >/dev/null
}

# --- 5./6. env file and ~/.ssh ------------------------------------------------------------------

write_env() {
    write_if_changed "$ENV_FILE" "# Generated by scripts/testbed.sh up; shell-sourceable.
export COSMOS_TESTBED_DIR='$STATE'
export COSMOS_TESTBED_SSH_HOST='$SSH_HOST'
export COSMOS_TESTBED_SSH_PORT='$SSH_PORT'
export COSMOS_TESTBED_SSH_USER='$SSH_USER'
export COSMOS_TESTBED_SSH_KEY='$USER_KEY'
export COSMOS_TESTBED_HOST_KEY='$(host_key_line)'
export COSMOS_TESTBED_KNOWN_HOSTS='$KNOWN_HOSTS'
export COSMOS_TESTBED_DOCKER_HOST='$DOCKER_HOST_URL'
export COSMOS_TESTBED_DOCKER_URL='ssh://$SSH_USER@$SSH_HOST:$SSH_PORT'
export COSMOS_TESTBED_BASE_IMAGE='$IMAGE'
export CONTAINERS_CONF='$CONTAINERS_CONF'
export CONTAINERS_STORAGE_CONF='$CONTAINERS_STORAGE_CONF'" || true
}

write_user_ssh() {
    # No Port line: the docker URL carries the port, and other uses of 127.0.0.1 stay untouched.
    # The trailing "Host *" closes our block so lines appended later stay global.
    replace_block "$USER_SSH_DIR/config" "Host $SSH_HOST
    IdentityFile $USER_KEY
Host *"
    replace_block "$USER_SSH_DIR/known_hosts" "[$SSH_HOST]:$SSH_PORT $(host_key_line)"
}

# End-to-end check: the same path the docker SDK takes (ssh, then the docker CLI on the far side).
check_remote_docker() {
    ssh -F /dev/null -i "$USER_KEY" -p "$SSH_PORT" -o BatchMode=yes -o IdentitiesOnly=yes \
        -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$KNOWN_HOSTS" -o ConnectTimeout=5 \
        "$SSH_USER@$SSH_HOST" docker version --format '{{.Server.Version}}'
}

# --- commands -----------------------------------------------------------------------------------

cmd_up() {
    [[ $(id -u) == 0 ]] || die "must run as root"
    local start=$SECONDS version
    mkdir -p "$STATE"
    # Parallel callers (pytest-xdist workers, CI steps) wait for one another. The daemons started
    # below get `9>&-`: an inherited fd 9 would hold this lock for as long as they live.
    exec 9>"$STATE/.lock"
    flock 9
    ensure_packages
    ensure_keys
    write_podman_conf
    ensure_podman
    ensure_image
    ensure_sshd
    write_user_ssh
    write_env
    version=$(check_remote_docker) || die "ssh -> docker system dial-stdio -> podman failed"
    log "up in $((SECONDS - start)) s: ssh://$SSH_USER@$SSH_HOST:$SSH_PORT -> podman $version; env: $ENV_FILE"
}

cmd_down() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock 9
    if podman_ping; then
        # Containers run under conmon and would outlive the service; stop ours (this storage only).
        podman stop --all --time 5 >/dev/null 2>&1 || log "warning: 'podman stop --all' failed"
    fi
    stop_pid "$PODMAN_PID" "$PODMAN_SOCK" "podman service"
    rm -f "$PODMAN_SOCK"
    stop_pid "$SSHD_PID" "$SSHD_CONFIG" "sshd"
    replace_block "$USER_SSH_DIR/config" ""
    replace_block "$USER_SSH_DIR/known_hosts" ""
    log "down"
}

cmd_status() {
    local ok=0
    if pid_alive "$SSHD_PID" "$SSHD_CONFIG" && port_open; then
        echo "sshd:   running (pid $(cat "$SSHD_PID")) on $SSH_HOST:$SSH_PORT"
    else
        echo "sshd:   stopped"; ok=1
    fi
    if pid_alive "$PODMAN_PID" "$PODMAN_SOCK" && podman_ping; then
        echo "podman: running (pid $(cat "$PODMAN_PID")) on $PODMAN_SOCK"
        if podman image exists "$IMAGE"; then
            echo "image:  $IMAGE present"
        else
            echo "image:  $IMAGE missing"; ok=1
        fi
    else
        echo "podman: stopped"; ok=1
    fi
    if ((ok == 0)) && check_remote_docker >/dev/null 2>&1; then
        echo "remote: ssh -> docker dial-stdio -> podman works"
    else
        echo "remote: not working"; ok=1
    fi
    [[ -f $ENV_FILE ]] && echo "env:    $ENV_FILE" || echo "env:    missing"
    return $ok
}

cmd_env() {
    [[ -f $ENV_FILE ]] || die "$ENV_FILE missing; run '$0 up' first"
    cat "$ENV_FILE"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
