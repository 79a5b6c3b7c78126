"""The `tandem` command: serve a graph, run one service, check a config, and the tools
other modules register (`infra`, `model`, `ray`, and `router` / `disagg` for the live
tunables their owners declare)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvloop

import app.doctor.cli
import app.infra
import app.model.tiny
import app.ray_cluster
import app.status.cli
import app.tunables.cli
from app import env
from app.disagg.tunables import DISAGG_TUNABLES
from app.launch.devices import node_devices
from app.router.tunables import ROUTER_TUNABLES
from app.runtime.connect import check_reachable
from app.runtime.errors import ConnectError
from app.sdk import graph, graph_watch, supervisor
from app.sdk.config import ConfigError, load_config
from app.sdk.process import add_graph_argument, add_service_arguments, run_one, split_overrides
from app.sdk.serve_plan import serve_plan
from app.settings import RuntimeSettings

log = logging.getLogger("tandem")


def _serve(args: argparse.Namespace) -> int:
    try:
        plan = serve_plan(args.address, args.config_file, args.overrides, args.service_name)
        services, config = plan.services, plan.config
        for name in sorted(plan.embedded & {s.name for s in services}):
            # Said even by default (the Router inside the Frontend): a plan without the
            # service, or its ServiceArgs (workers: N) no longer applying, must not look like a loss.
            print(
                f"note: {name} runs inside another service of the graph (embed-*), not in processes of its own",
                file=sys.stderr,
            )
        processes, devices = supervisor.plan(plan.separate, config, args.overrides, node_devices(), args.address)
    except (graph.GraphError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    shortfall = devices.shortfall()
    if args.dry_run:
        print("\n".join(supervisor.describe(processes)))
        if shortfall is not None and not devices.node.ids:
            # A machine without GPUs plans for the nodes that have them.
            print(f"note: {shortfall} here", file=sys.stderr)
            return 0
    if shortfall is not None:
        print(f"error: {shortfall}; nothing started", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    try:
        # Before any process starts: services that cannot connect would only be restarted
        # by supervisord, again and again, for as long as the server is away.
        uvloop.run(check_reachable(RuntimeSettings()))
    except ConnectError as exc:
        print(f"error: {exc}; nothing started", file=sys.stderr)
        return 1
    planned = {p.name: p.processes for p in processes}
    watch = graph_watch.GraphWatch(graph_watch.expected_services(services, planned, config), RuntimeSettings())
    return supervisor.run_supervisord(processes, watch)


def _run_service(args: argparse.Namespace) -> int:
    return run_one(args.address, args.config_file, args.overrides, args.graph)


def _config_env(args: argparse.Namespace) -> int:
    rows = env.table()
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    reader = None
    for row in rows:
        if row[0] != reader:
            print(f"{'' if reader is None else chr(10)}# read by {row[0]}")
            reader = row[0]
        print("  ".join(value.ljust(width) for value, width in zip(row[1:4], widths[1:], strict=True)) + f"  {row[4]}")
    return 0


def _config_check(args: argparse.Namespace) -> int:
    try:
        graph.import_components()
        services = None
        if args.graph is not None:
            module, entry = graph.resolve(args.graph)
            services = graph.graph_services(module, entry)
        config = load_config(args.config_file, args.overrides)
        errors = config.check(services, check_engine_args=True)
    except (graph.GraphError, ConfigError) as exc:
        errors = str(exc).splitlines()
    if errors:
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 1
    print(f"OK: {args.config_file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: multi-node LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run a graph's services under supervisord, in the foreground",
        epilog="Overrides: --Service.key=value (value parsed as YAML), e.g. --VllmWorker.ServiceArgs.workers=2",
    )
    add_service_arguments(serve)
    serve.add_argument("--service-name", help="run only this service of the graph, ignoring its links")
    serve.add_argument("--dry-run", action="store_true", help="print the processes, start nothing")
    serve.set_defaults(func=_serve, takes_overrides=True)

    run = commands.add_parser("run-service", help="(internal) run one service in the foreground")
    add_service_arguments(run)
    add_graph_argument(run)
    run.set_defaults(func=_run_service, takes_overrides=True)

    config = commands.add_parser("config", help="graph config tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config file without starting anything")
    check.add_argument("-f", "--config", dest="config_file", required=True, help="graph config YAML")
    check.add_argument("graph", nargs="?", metavar="MODULE:Service", help="check only this graph's services")
    check.set_defaults(func=_config_check, takes_overrides=True)
    listing = config_commands.add_parser("env", help="list every environment variable Tandem reads")
    listing.set_defaults(func=_config_env)

    app.infra.add_cli(commands)
    app.model.tiny.add_cli(commands)
    app.ray_cluster.add_cli(commands)
    app.tunables.cli.add_cli(commands, (ROUTER_TUNABLES, DISAGG_TUNABLES))
    app.status.cli.add_cli(commands, (ROUTER_TUNABLES, DISAGG_TUNABLES))
    app.doctor.cli.add_cli(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if getattr(args, "takes_overrides", False):
        args.overrides = split_overrides(parser, extras)
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        return args.func(args)
    except env.EnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
