#!/usr/bin/env bash
# Set up sagecell_tw on this machine: Debian packages (as root), the worker
# account (as root), the widget bundle, and a virtualenv with the package.
# Everything the tests need too, so that `./setup.sh && .venv/bin/python -m
# pytest -q` works on a fresh machine (SAGECELL_TEST_PACKAGES=0: only what
# the service needs).
#
# Sage (passagemath, ~4.3 GB, ~2 minutes) is installed too, and the server
# then runs Sage kernels by default beside Python ones. For a Python-only
# server: ./setup.sh --python-only (or SAGECELL_SAGE=0).
#
# As root the venv lives in /opt/sagecell_tw/venv (the unprivileged worker
# account must be able to read the Python that kernels run on) and .venv
# points at it; otherwise it is ./.venv. Set SAGECELL_VENV to choose.
set -euo pipefail
cd "$(dirname "$0")"

sage=${SAGECELL_SAGE:-1}
for arg in "$@"; do
    case "$arg" in
        --python-only) sage=0 ;;
        *) echo "setup.sh: unknown option $arg (the one option is --python-only)" >&2; exit 2 ;;
    esac
done

# python3-venv: the virtualenv. For the tests: chromium (the widget in a
# headless browser), curl (TLS as curl speaks it), iproute2 (network
# namespaces for the worker-host tests), procps (pgrep), nginx (the API
# under a path prefix behind a real reverse proxy: tests/test_proxy.py).
packages=(python3 python3-venv)
test_packages=(chromium curl iproute2 procps nginx)
test_packages+=(haproxy)  # tests/test_haproxy.py, bench/bench_haproxy.py: daemons behind a real HAProxy
# postgresql: a server of their own for the tests of the PostgreSQL permalink store.
test_packages+=(postgresql)
if [ "${SAGECELL_TEST_PACKAGES:-1}" != 0 ]; then
    packages+=("${test_packages[@]}")
fi
missing=()
for pkg in "${packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done

if [ "$(id -u)" = 0 ]; then
    venv=${SAGECELL_VENV:-/opt/sagecell_tw/venv}
    # A nodejs from elsewhere may bring its own npm (and conflict with Debian's).
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    if [ ${#missing[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}"
    fi
    command -v npm >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm
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
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup.sh: not root, so not installing the Debian packages ${missing[*]}; the tests that need them will fail" >&2
    fi
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
if [ "$sage" != 0 ]; then
    "$venv/bin/pip" install -q ".[scientific,test,sage]"
else
    "$venv/bin/pip" install -q ".[scientific,test]"
    # A venv that had Sage keeps it: the server would still run Sage kernels.
    if "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('sage.all_cmdline') is None)" 2>/dev/null; then
        echo "setup.sh: $venv still has passagemath from before; the server serves Sage kernels unless run with --kernels python3" >&2
    fi
fi
if [ "$venv" != "$PWD/.venv" ]; then
    ln -sfn "$venv" .venv
fi
echo "sagecell_tw is set up in $venv"
