#!/bin/sh
# In the test system's chroot, after fedd, fedd-hub and mosquitto are
# installed: a whole fleet on one machine, provisioned as docs/operations.md
# ("Certificates and the broker ACL") and the README's operator section say.
set -eu
pki=/root/pki
fedd-provision --pki $pki ca --fleet pkgtest
fedd-provision --pki $pki broker --host 127.0.0.1 --host localhost
fedd-provision --pki $pki hub
fedd-provision --pki $pki monitor
fedd-provision --pki $pki device pi-001
fedd-provision --pki $pki mosquitto --port 8883
# The broker.
install -d /etc/mosquitto/fedd
cp $pki/broker/* /etc/mosquitto/fedd/
chown root:mosquitto /etc/mosquitto/fedd/broker.key
chmod 0640 /etc/mosquitto/fedd/broker.key
install -d /etc/systemd/system/mosquitto.service.d
printf '[Service]\nExecStart=\nExecStart=/usr/sbin/mosquitto -c /etc/mosquitto/fedd/fedd-broker.conf\n' \
    >/etc/systemd/system/mosquitto.service.d/fedd.conf
# The device's bundle where fedd.yaml expects it; the key readable, not
# writable, by the agent (root:fedd 0640, as the README says).
install -o root -g root -m 0644 $pki/devices/pi-001/ca.crt $pki/devices/pi-001/client.crt /etc/fedd/tls/
install -o root -g fedd -m 0640 $pki/devices/pi-001/client.key /etc/fedd/tls/
# The hub's bundle beside it (hub and device share this machine).
install -d -m 0755 /etc/fedd/tls/hub
install -o root -g root -m 0644 $pki/hub/ca.crt $pki/hub/client.crt /etc/fedd/tls/hub/
install -o root -g fedd-hub -m 0640 $pki/hub/client.key /etc/fedd/tls/hub/
