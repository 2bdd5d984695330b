"""In the booted test system, after enrollment: the hub requires attestation and signatures.

Argument: the device's enrollment record. The class's PCR policy takes the
values the device quoted at enrollment (docs/security.md, "Setting the PCR
policy"); the agent quotes through the test's swtpm and signs its updates.
"""

import json
import sys

import yaml

TCTI = "swtpm:host=127.0.0.1,port=2321"

with open(sys.argv[1]) as src:
    record = json.load(src)
pcrs = record["tpm"]["binding"]["pcrs"]
with open("/etc/fedd/pcr-policy.yaml", "w") as out:
    yaml.safe_dump({"format": 1, "classes": {record["device_class"]: {"pcrs": {
        int(index): [value] for index, value in pcrs.items()}}}}, out)

with open("/etc/fedd/fedd.yaml") as src:
    agent = yaml.safe_load(src)
agent["trust"].update(tcti=TCTI, signing_key="/var/lib/fedd/update.key")
with open("/etc/fedd/fedd.yaml", "w") as out:
    out.write("# fedd.yaml as the packaging test's operator edited it\n")
    yaml.safe_dump(agent, out, sort_keys=False)

with open("/etc/fedd/hub.yaml") as src:
    hub = yaml.safe_load(src)
hub["trust"].update(mode="require", require_signatures=True,
                    enrollments="/var/lib/fedd-hub/enrollments",
                    pcr_policy="/etc/fedd/pcr-policy.yaml")
with open("/etc/fedd/hub.yaml", "w") as out:
    yaml.safe_dump(hub, out, sort_keys=False)
