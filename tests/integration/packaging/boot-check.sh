#!/bin/sh
# Inside the booted test system (as fedd-pkgtest.service): run the packaged
# fleet under systemd the way an operator would, record what happened in
# $R for tests/integration/test_packaging.py, and power off. Every wait is
# bounded; a failed step is recorded, never fatal, so the results are always
# written.
set -u
R=/srv/fedd-pkgtest/results
PY=/usr/lib/fedd/bin/python
mkdir -p "$R"
exec >"$R/driver.log" 2>&1
set -x

mark() { echo "$1" >>"$R/steps.txt"; }
show() { systemctl show "$1" -p ActiveState,SubState,Result,NRestarts,MainPID,ExecMainStatus,StatusText,MemoryCurrent >"$R/show-$2.txt" 2>&1; }
mainpid() { systemctl show fedd.service -p MainPID --value; }
# Wait up to $1 s for a Python condition on the agent's status.json.
wait_status() {
    n=0
    while [ "$n" -lt "$1" ]; do
        if "$PY" -c "import json, sys; s = json.load(open('/var/lib/fedd/status.json')); sys.exit(0 if ($2) else 1)" 2>/dev/null; then
            return 0
        fi
        sleep 1
        n=$((n + 1))
    done
    return 1
}
wait_active() {
    n=0
    while [ "$n" -lt "$2" ]; do
        [ "$(systemctl show "$1" -p ActiveState --value)" = active ] && [ "$(systemctl show "$1" -p SubState --value)" = running ] && return 0
        sleep 1
        n=$((n + 1))
    done
    return 1
}

# --- the fleet: enabled at installation, broker, hub and agent started at boot
# (after enroll.sh, fedd-pkgtest-enroll.service, enrolled the device)
systemctl is-enabled fedd.service >"$R/enabled-fedd.txt" 2>&1
systemctl is-enabled fedd-hub.service >"$R/enabled-hub.txt" 2>&1
for unit in fedd.service fedd-hub.service; do
    wait_active "$unit" 60 && mark "$unit started at boot"
done
systemctl start mosquitto.service && mark "mosquitto started"
systemctl start fedd-hub.service && mark "hub started"
systemctl start fedd.service && mark "agent started"
if wait_status 120 's["model_version"] is not None and s["model_version"] >= 2 and s["updates_sent"] >= 2 and s.get("trusted") is True'; then
    mark "agent working"
fi
cp /var/lib/fedd-hub/status.json "$R/hub-status.json"
show fedd.service agent
show fedd-hub.service hub
show mosquitto.service broker
fedd status >"$R/fedd-status.txt" 2>&1
cp /var/lib/fedd/status.json "$R/status.json"
# An operator in group fedd may read the status (UMask=0027, StateDirectoryMode=0750).
useradd --no-create-home --groups fedd opsuser && runuser -u opsuser -- fedd status >"$R/fedd-status-operator.txt" 2>&1
userdel opsuser
systemd-analyze security fedd.service fedd-hub.service >"$R/security.txt" 2>&1
pid=$(mainpid)
grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp|Cpus_allowed_list):' "/proc/$pid/status" >"$R/agent-proc-status.txt"
cat "/proc/$pid/mountinfo" >"$R/agent-mountinfo.txt"
cat "/proc/$pid/limits" >"$R/agent-limits.txt"
# The sandbox from the inside: the system and /sys are read-only, the state directory is not.
set +x
for path in /usr/lib/fedd /etc/fedd /sys/class /var/lib/fedd /home; do
    printf '%s ' "$path"
    nsenter -t "$pid" -m -- findmnt -n -o OPTIONS -T "$path" | cut -d, -f1
done >"$R/agent-mounts.txt" 2>&1
set -x

# --- watch: a heartbeat with the read-only monitor's certificate
timeout 30 mosquitto_sub -h 127.0.0.1 -p 8883 --cafile /root/pki/monitor/ca.crt \
    --cert /root/pki/monitor/client.crt --key /root/pki/monitor/client.key \
    -t 'fedd/v1/pkgtest/heartbeat/+' -C 1 -W 25 >"$R/heartbeat.json" 2>"$R/heartbeat.err" && mark "heartbeat heard"

# --- reload: SIGHUP through systemctl
systemctl reload fedd.service && mark "agent reloaded"
sleep 2

# --- the watchdog under systemd: a stopped process stops pinging and is restarted
mkdir -p /run/systemd/system/fedd.service.d
printf '[Service]\nWatchdogSec=4\nTimeoutAbortSec=3\n' >/run/systemd/system/fedd.service.d/pkgtest-watchdog.conf
systemctl daemon-reload
systemctl restart fedd.service
wait_active fedd.service 60 && mark "agent restarted with WatchdogSec=4"
sleep 3
before=$(mainpid)
show fedd.service before-freeze
kill -STOP "$before" && mark "agent frozen"
n=0
while [ "$n" -lt 40 ] && [ "$(mainpid)" = "$before" ]; do sleep 1; n=$((n + 1)); done
wait_active fedd.service 60 && mark "agent running again after the watchdog"
show fedd.service after-watchdog
rm -f /run/systemd/system/fedd.service.d/pkgtest-watchdog.conf
systemctl daemon-reload
systemctl restart fedd.service
wait_active fedd.service 60

# --- upgrade: a newer package restarts the running agent and keeps its config and state
sha256sum /etc/fedd/fedd.yaml >"$R/conffile-before-upgrade.txt"
before=$(mainpid)
DEBIAN_FRONTEND=noninteractive apt-get install -y -q /srv/fedd-pkgtest/upgrade/fedd_*.deb >"$R/upgrade.log" 2>&1 && mark "upgraded"
dpkg-query -W -f='${Version}\n' fedd >"$R/version-after-upgrade.txt"
sha256sum /etc/fedd/fedd.yaml >"$R/conffile-after-upgrade.txt"
ls /etc/fedd >"$R/etc-after-upgrade.txt"
wait_active fedd.service 60 && [ "$(mainpid)" != "$before" ] && mark "agent restarted by the upgrade"
if wait_status 60 's["pid"] != '"$before"' and s["windows"] > 0'; then mark "agent working after the upgrade"; fi
show fedd.service after-upgrade

# --- stop: a clean exit (0) that systemd records as a success
systemctl stop fedd.service fedd-hub.service
show fedd.service stopped
show fedd-hub.service hub-stopped

# --- remove: the running services are stopped, config and state stay (purge follows in the chroot)
systemctl start fedd-hub.service fedd.service
wait_active fedd.service 60 && mark "agent running before removal"
DEBIAN_FRONTEND=noninteractive apt-get remove -y -q fedd-hub fedd >"$R/remove.log" 2>&1 && mark "removed"
sleep 1
pgrep -u fedd >"$R/fedd-processes-after-remove.txt" || mark "no fedd process after removal"
pgrep -u fedd-hub >"$R/hub-processes-after-remove.txt" || mark "no fedd-hub process after removal"
dpkg-query -W -f='${db:Status-Abbrev}\n' fedd fedd-hub >"$R/status-after-remove.txt" 2>&1

journalctl -o json --no-pager -u fedd.service -u fedd-hub.service >"$R/journal.json"
journalctl --no-pager -b >"$R/journal.txt"
mark "done"
systemctl poweroff
