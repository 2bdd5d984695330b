"""In the test system's chroot, with /usr/lib/fedd/bin/python: the operator's edits.

The agent replays HAPT person 1 (a stream file the test made from the data
on the build machine: the package carries no data set) fast, trains often
and reports every 2 s; the hub makes a version from every update.
"""

import yaml

with open("/etc/fedd/fedd.yaml") as src:
    agent = yaml.safe_load(src)
agent["device_id"] = "pi-001"
agent["fleet"] = "pkgtest"
agent["sensor"]["replay"].update(dataset="stream", npz_path="/srv/fedd-pkgtest/person-01.npz",
                                 speed=50.0)
agent["training"].update(min_windows=32, min_interval_s=1.0)
agent["heartbeat"]["interval_s"] = 2.0
# The test system is a container on a busy CI machine: its load is not the device's job.
agent["scheduler"].update(max_cpu_percent=100.0, cpu_budget_s_per_hour=None,
                          max_runs_per_day=None)
with open("/etc/fedd/fedd.yaml", "w") as out:
    out.write("# fedd.yaml as the packaging test's operator edited it\n")
    yaml.safe_dump(agent, out, sort_keys=False)

with open("/etc/fedd/hub.yaml") as src:
    hub = yaml.safe_load(src)
hub["fleet"] = "pkgtest"
hub["broker"]["tls"] = {"ca_file": "/etc/fedd/tls/hub/ca.crt",
                        "cert_file": "/etc/fedd/tls/hub/client.crt",
                        "key_file": "/etc/fedd/tls/hub/client.key"}
hub["aggregation"].update(buffer_size=1, quorum=1, max_wait_s=1.0)
with open("/etc/fedd/hub.yaml", "w") as out:
    yaml.safe_dump(hub, out, sort_keys=False)
