"""One service in the foreground: what each supervisord program of `tandem serve` runs.

`python -m app.sdk.process MODULE:Service [-f CONFIG] [--Service.key=value ...]`; the same as
`tandem run-service`, without loading the rest of the command line tool.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvloop

from app import env
from app.launch.processes import die_with_parent
from app.sdk.config import ConfigError, is_override, load_config
from app.sdk.graph import GraphError, graph_service_names, resolve
from app.sdk.runner import ServiceFailedError, configure_logging, run_service
from app.settings import RuntimeSettings

log = logging.getLogger(__name__)


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="MODULE:Service", help="e.g. components.worker:VllmWorker")
    parser.add_argument("-f", "--config", dest="config_file", help="graph config YAML")


def add_graph_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--graph",
        metavar="MODULE:Service",
        help="the graph this service runs in (default: the service and its dependencies)",
    )


def split_overrides(parser: argparse.ArgumentParser, extras: Sequence[str]) -> list[str]:
    """Keep `--Service.key=value` overrides; anything else unknown is a usage error."""
    overrides = [arg for arg in extras if is_override(arg) and "=" in arg]
    rest = [arg for arg in extras if arg not in overrides]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (overrides are --Service.key=value)")
    return overrides


def run_one(address: str, config_file: str | None, overrides: Sequence[str], graph: str | None = None) -> int:
    """Serve one service until SIGTERM/SIGINT; the exit status for supervisord."""
    try:
        _, spec = resolve(address)
        graph_names = graph_service_names(graph or address)
    except GraphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    configure_logging(spec.name, env.TANDEM_REPLICA.get())
    if env.SUPERVISOR_ENABLED.get():
        # A program of a supervisord that dies by SIGKILL stops as if it had stopped it;
        # a VllmWorker's engine then stops with it (and app.launch.leftovers catches what
        # a worker killed outright leaves).
        die_with_parent()
    try:
        config = load_config(config_file, overrides)
        uvloop.run(run_service(spec.cls, config, RuntimeSettings(), graph=graph_names))
    except ConfigError as exc:
        for line in exc.errors:
            log.error("config: %s", line)
        return 1
    except ServiceFailedError as exc:
        log.error("%s exits: %s", spec.name, exc)
        return 1
    except Exception:
        log.exception("%s failed", spec.name)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.sdk.process", description=__doc__)
    add_service_arguments(parser)
    add_graph_argument(parser)
    args, extras = parser.parse_known_args(argv)
    return run_one(args.address, args.config_file, split_overrides(parser, extras), args.graph)


if __name__ == "__main__":
    sys.exit(main())
