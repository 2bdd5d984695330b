#!/bin/sh
# At boot, before fedd and fedd-hub start (fedd-pkgtest-enroll.service):
# enroll the device's TPM (the test's swtpm) and update key with the hub as
# the README says, then make the hub require attestation and signatures.
set -u
R=/srv/fedd-pkgtest/results
mkdir -p "$R"
exec >"$R/enroll.log" 2>&1
set -x
mark() { echo "$1" >>"$R/steps.txt"; }
fedd-enroll device --tcti swtpm:host=127.0.0.1,port=2321 --class pkgtest \
    --certificate /etc/fedd/tls/client.crt --key /var/lib/fedd/update.key \
    --measure --model /usr/share/fedd/models/har-mlp.tflite --out /srv/fedd-pkgtest/pi-001.json \
    && mark "enrolled"
chown fedd:fedd /var/lib/fedd/update.key
runuser -u fedd-hub -- fedd-enroll register --store /var/lib/fedd-hub/enrollments \
    /srv/fedd-pkgtest/pi-001.json && mark "registered"
/usr/lib/fedd/bin/python /srv/fedd-pkgtest/configure-trust.py /srv/fedd-pkgtest/pi-001.json \
    && fedd check-config /etc/fedd/fedd.yaml && fedd check-config /etc/fedd/hub.yaml \
    && mark "trust required"
exit 0
