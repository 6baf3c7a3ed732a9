# Sourced by tools/test and tools/demo: install what uvdma's tests and demo need.
# Safe to run again: it installs only what is missing, and the virtual environment is
# rebuilt only when pyproject.toml changes.
#   Debian packages: qemu-system-x86 (the VM), linux-image-amd64 (the guest kernel),
#                    busybox-static (virtme-ng's guest init), python3-venv
#   .venv:           uvdma in editable mode with its test, vm and dev extras, and the NVMe
#                    example driver (examples/nvme, package uvdma_nvme) in editable mode

UVDMA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$UVDMA_ROOT/.venv"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "uvdma: these Debian packages are missing: ${missing[*]}" >&2
        echo "uvdma: install them as root: apt-get install ${missing[*]}" >&2
        return 1
    fi
    say "installing Debian packages: ${missing[*]} (about a minute, once)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || return 1
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || {
        echo "uvdma: apt-get install ${missing[*]} failed" >&2
        return 1
    }
}

pick_python() {
    local py
    for py in python3 python3.13 python3.12 python3.11 python3.10; do
        if command -v "$py" >/dev/null &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    echo "uvdma: needs Python 3.10 or newer: apt-get install python3" >&2
    return 1
}

setup_venv() {
    local py stamp want
    py="$(pick_python)" || return 1
    if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
        need_packages python3-venv || return 1
    fi
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c pass 2>/dev/null; then
        say "creating $VENV"
        rm -rf "$VENV"
        "$py" -m venv "$VENV" || return 1
    fi
    want="$(cat "$UVDMA_ROOT/pyproject.toml" "$UVDMA_ROOT/examples/nvme/pyproject.toml" |
        sha256sum | cut -d' ' -f1)"
    stamp="$VENV/.uvdma-installed"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] ||
        ! "$VENV/bin/python" -c 'import uvdma, uvdma_nvme, pytest, hypothesis, mypy, virtme_ng, matplotlib' 2>/dev/null; then
        say "installing uvdma and its test tools into .venv"
        if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
            "$VENV/bin/python" -m pip install --disable-pip-version-check \
                -e "$UVDMA_ROOT[test,vm,dev,plot]" -e "$UVDMA_ROOT/examples/nvme"; } >"$VENV/pip.log" 2>&1; then
            tail -n 30 "$VENV/pip.log" >&2
            echo "uvdma: installing into .venv failed; the whole log is $VENV/pip.log" >&2
            return 1
        fi
        echo "$want" >"$stamp"
    fi
}

setup_all() {
    need_packages qemu-system-x86 linux-image-amd64 busybox-static || return 1
    setup_venv || return 1
}
