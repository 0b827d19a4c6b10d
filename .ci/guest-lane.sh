#!/bin/bash
# Runs inside the cgroup v2 guest (see .ci/run): the guest-marked tests as root, then as a plain user in a
# cgroup delegated the way systemd does it (Delegate=yes: the directory, cgroup.procs, cgroup.subtree_control
# and cgroup.threads belong to the user).
#   guest-lane.sh VENV CI_USER USER_VENV USER_SRC
set -euo pipefail
VENV=$1 CI_USER=$2 USER_VENV=$3 USER_SRC=$4
test -f /sys/fs/cgroup/cgroup.controllers
echo "controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
# What the init system of a v2 host does at boot: hand the controllers down from the root, bring up loopback
# (pytest-xdist plugins talk over it: pytest-rerunfailures' workers connect to 127.0.0.1).
echo "+memory +pids +cpu +io" > /sys/fs/cgroup/cgroup.subtree_control
"$VENV/bin/python" -c "from pytest_sandbox.linux import syscalls; syscalls.loopback_up()"

echo "--- root"
"$VENV/bin/pytest-sandbox" doctor
"$VENV/bin/python" -m pytest -p no:cacheprovider -m guest -v -rs --durations=8 tests

echo "--- $CI_USER in a delegated cgroup"
delegated=/sys/fs/cgroup/sandbox-ci.scope
mkdir -p "$delegated"
chown "$CI_USER:" "$delegated" "$delegated"/cgroup.procs "$delegated"/cgroup.subtree_control "$delegated"/cgroup.threads
home=$(getent passwd "$CI_USER" | cut -d: -f6)
uid=$(id -u "$CI_USER") gid=$(id -g "$CI_USER")
cd "$USER_SRC"
sh -c "echo \$\$ > $delegated/cgroup.procs && exec setpriv --reuid=$uid --regid=$gid --init-groups \
    env HOME=$home $USER_VENV/bin/python -m pytest -p no:cacheprovider -m 'guest or rootless' -v -rs --durations=8 tests"
