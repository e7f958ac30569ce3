#!/usr/bin/env bash
# Set up sagecell_tw on this machine: Debian packages (as root), the worker
# account (as root), the widget bundle, and a virtualenv with the package.
#
# As root the venv lives in /opt/sagecell_tw/venv (the unprivileged worker
# account must be able to read the Python that kernels run on) and .venv
# points at it; otherwise it is ./.venv. Set SAGECELL_VENV to choose.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" = 0 ]; then
    venv=${SAGECELL_VENV:-/opt/sagecell_tw/venv}
    missing=()
    for pkg in python3 python3-venv; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    # A nodejs from elsewhere may bring its own npm (and conflict with Debian's).
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}"
    fi
    command -v npm >/dev/null 2>&1 || apt-get install -y -qq npm
    if ! id sagecell-worker >/dev/null 2>&1 || ! id sagecell >/dev/null 2>&1; then
        if command -v systemd-sysusers >/dev/null 2>&1; then
            # An absolute path: a relative one is taken as a name in sysusers.d, and ignored.
            systemd-sysusers "$PWD/etc/sagecell-sysusers.conf"
        else
            id sagecell-worker >/dev/null 2>&1 ||
                useradd --system --user-group --no-create-home --shell /usr/sbin/nologin sagecell-worker
            id sagecell >/dev/null 2>&1 ||
                useradd --system --user-group --groups sagecell-worker --no-create-home --shell /usr/sbin/nologin sagecell
        fi
    fi
else
    venv=${SAGECELL_VENV:-$PWD/.venv}
fi

# The widget: npm packages from the lock file, bundled into sagecell_tw/static.
(cd js && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
# The test that drives the server with JupyterLab's own client library.
(cd tests/jupyterlab_client && npm ci --no-audit --no-fund --loglevel=error)

if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    /usr/bin/python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q ".[scientific,test]"
if [ "$venv" != "$PWD/.venv" ]; then
    ln -sfn "$venv" .venv
fi
echo "sagecell_tw is set up in $venv"
