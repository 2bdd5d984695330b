"""One command line for every fedd program: `fedd agent`, `fedd hub`, …"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from fedd import __version__
from fedd.config import (
    EXIT_CONFIG_INVALID,
    ConfigError,
    UnusableFileError,
    load_agent_config,
    load_config,
    load_hub_config,
)
from fedd.datasets.hapt import DatasetError
from fedd.model import ModelError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_STATUS = 3
EXIT_DATA = 65  # sysexits EX_DATAERR: the model or the dataset is missing or corrupt

DEFAULT_AGENT_CONFIG = "/etc/fedd/fedd.yaml"
DEFAULT_HUB_CONFIG = "/etc/fedd/hub.yaml"

log = logging.getLogger("fedd")


def _config_error(exc: ConfigError) -> int:
    print(f"fedd: invalid configuration: {exc}", file=sys.stderr)
    return exc.exit_code


def cmd_agent(args: argparse.Namespace) -> int:
    from fedd.agent.daemon import Agent
    from fedd.service import Notifier, serve, setup_logging

    config = load_agent_config(args.config)
    setup_logging(config.log_level, identifier="fedd",
                  fields={"FEDD_ROLE": "agent", "FEDD_DEVICE": config.device_id,
                          "FEDD_FLEET": config.fleet})
    notifier = Notifier()
    asyncio.run(serve(Agent(config, notifier), notifier, lambda: load_agent_config(args.config)))
    return EXIT_OK


def cmd_hub(args: argparse.Namespace) -> int:
    from fedd.hub.service import HubService
    from fedd.service import Notifier, serve, setup_logging

    config = load_hub_config(args.config)
    setup_logging(config.log_level, identifier="fedd-hub",
                  fields={"FEDD_ROLE": "hub", "FEDD_FLEET": config.fleet})
    notifier = Notifier()
    asyncio.run(serve(HubService(config, notifier), notifier,
                      lambda: load_hub_config(args.config)))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file, role=args.role)
    role = "hub" if type(config).__name__ == "HubConfig" else "agent"
    print(f"{args.file}: valid {role} configuration")
    return EXIT_OK


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def cmd_status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir or load_config(args.config).state_dir)
    path = state_dir / "status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"fedd: no status at {path}: {exc}", file=sys.stderr)
        return EXIT_NO_STATUS
    if args.json:
        print(json.dumps(status, indent=1))
        return EXIT_OK
    now = time.time()
    if "device" not in status:  # the hub's status file
        print(f"hub           version {status['version']} ({status['digest'][:16]}…)")
        print(f"buffered      {status['buffered']} updates")
        print(f"accepted      {status['accepted']}   duplicates {status.get('duplicates', 0)}"
              f"   rejected {status['rejected'] or 'none'}")
        if trust := status.get("trust"):  # fedd.hub.trust's counts
            print(f"trust         mode {trust['mode']}: {trust['trusted']} devices trusted, "
                  f"{trust['untrusted']} not; {trust['flagged_updates']} flagged updates; "
                  f"verdicts {trust['verdicts'] or 'none'}")
        if robust := status.get("robust"):  # fedd.hub.robust's measurements
            median = robust["median_norm"]
            print(f"robust        rule {robust['rule']}, median norm "
                  f"{'warming up' if median is None else f'{median:.4g}'}, "
                  f"{robust['clipped']} clipped, {robust['rejected']} norm outliers")
        print(f"devices       {status['devices']}   (written {_age(now - status['time'])})")
        return EXIT_OK
    last = status.get("last_update")
    evaluation = status.get("evaluation")
    print(f"device        {status['device']}   (pid {status['pid']}, "
          f"written {_age(now - status['time'])})")
    print(f"model         version {status['model_version']}   delegate {status['delegate']}")
    print(f"activity      {status['activity']}")
    print(f"scheduler     {status['decision']}")
    print(f"store         {status['windows']} windows   outbox {status['outbox']} queued "
          f"({status['outbox_bytes']} bytes)")
    print(f"link          {'connected' if status['connected'] else 'DISCONNECTED'}, "
          f"{status['reconnects']} reconnects, {status['connect_failures']} failed attempts")
    print(f"uplink        {status['updates_sent']} updates, {status['uplink_bytes']} bytes; "
          f"hub accepted {status['acked']}, rejected "
          f"{status.get('rejected_updates') or 'none'}")
    if status.get("trusted") is not None:
        print("trust         " + ("trusted" if status["trusted"]
                                   else f"NOT trusted: {status['trust_reason']}"))
    if last:
        sent = (f"seq {last['seq']}" if last["seq"] is not None
                else f"stopped: {last['stopped']}" if last.get("stopped") else "not sent (local)")
        print(f"last round    {sent}, {last.get('trigger', 'version')} on version "
              f"{last['base_version']}, "
              f"{last['samples']} windows, loss {last['loss_before']} → {last['loss_after']}, "
              f"{_age(now - last['time'])}")
        if last.get("energy_j") is not None:
            print(f"              {last['cpu_s']} CPU-s, {last['energy_j']} J "
                  f"({last['energy_source']})" + (f"; stopped: {last['stopped']}"
                                                  if last.get("stopped") else ""))
    if evaluation:
        print(f"holdout       version {evaluation['version']}: personal "
              f"{evaluation['personal_accuracy']:.1%}, global {evaluation['global_accuracy']:.1%}"
              f" on {evaluation['windows']} windows")
    return EXIT_OK


def cmd_label(args: argparse.Namespace) -> int:
    from fedd.agent.labels import label_command

    return label_command(args)


def cmd_fleet(args: argparse.Namespace) -> int:
    from fedd.fleet.runner import FleetOptions, run_fleet

    try:
        options = FleetOptions(
            devices=args.devices, versions=args.versions, timeout_s=args.timeout,
            speed=args.speed, buffer_size=args.buffer_size, strategy=args.strategy,
            model=args.model, codec=args.codec,
            out=Path(args.out or time.strftime("runs/fleet-%Y%m%d-%H%M%S")))
    except ValueError as exc:
        print(f"fedd fleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_fleet(options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="run the device daemon")
    agent.add_argument("-c", "--config", default=DEFAULT_AGENT_CONFIG)
    agent.set_defaults(func=cmd_agent)

    hub = sub.add_parser("hub", help="run the aggregation hub")
    hub.add_argument("-c", "--config", default=DEFAULT_HUB_CONFIG)
    hub.set_defaults(func=cmd_hub)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.add_argument("--role", choices=["agent", "hub"],
                       help="default: hub if the file has an 'aggregation' section")
    check.set_defaults(func=cmd_check_config)

    status = sub.add_parser("status", help="show a local agent's (or hub's) state")
    status.add_argument("-c", "--config", default=DEFAULT_AGENT_CONFIG)
    status.add_argument("--state-dir", help="read this state directory instead")
    status.add_argument("--json", action="store_true", help="print the raw status")
    status.set_defaults(func=cmd_status)

    label = sub.add_parser("label", help="label the windows a live sensor stored in a span")
    label.add_argument("-c", "--config", default=DEFAULT_AGENT_CONFIG)
    label.add_argument("activity", help="what the user was doing: a class name or index")
    span = label.add_mutually_exclusive_group(required=True)
    span.add_argument("--last", metavar="DURATION", help="the last DURATION: 90s, 5m, 1h30m")
    span.add_argument("--from", dest="start", metavar="TIME",
                      help="ISO 8601 (local time unless it has an offset), HH:MM[:SS] today, "
                           "or Unix seconds")
    label.add_argument("--to", dest="end", metavar="TIME", help="with --from (default: now)")
    label.add_argument("--relabel", action="store_true",
                       help="also overwrite windows labelled with another class")
    label.set_defaults(func=cmd_label)

    fleet = sub.add_parser("fleet", help="run a local fleet on HAPT: broker, hub, agents")
    fleet.add_argument("--devices", type=int, default=10, help="people from HAPT (max 30)")
    fleet.add_argument("--versions", type=int, default=60, help="stop after this many versions")
    fleet.add_argument("--timeout", type=float, default=600.0, help="stop after this long (s)")
    fleet.add_argument("--speed", type=float, default=50.0, help="replay clock speed-up")
    fleet.add_argument("--buffer-size", type=int, default=5, help="FedBuff K")
    fleet.add_argument("--strategy", default="finetune",
                       choices=["finetune", "fedavg", "fedper", "fedrep", "ditto"],
                       help="what stays personal (training.strategy)")
    fleet.add_argument("--model", default="har-mlp", help="shipped model (models/manifest.json)")
    fleet.add_argument("--codec", default="float32",
                       help="the agents' uplink codec (uplink.codec), e.g. topk:0.01+q:4+zstd")
    fleet.add_argument("--out", default=None,
                       help="run folder for configs, logs and the report "
                            "(default: runs/fleet-<date>-<time>)")
    fleet.set_defaults(func=cmd_fleet)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        return _config_error(exc)
    except UnusableFileError as exc:  # e.g. broker.tls or trust.signing_key
        print(f"fedd: invalid configuration: {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG_INVALID
    except (ModelError, DatasetError) as exc:
        print(f"fedd: {exc}", file=sys.stderr)
        return EXIT_DATA
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
