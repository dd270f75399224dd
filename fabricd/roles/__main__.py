"""Entry point of a role process: ``python -m fabricd.roles ARGS_JSON`` (started by the supervisor),
or :func:`main` called in a process forked from the role template (``fabricd.roles.template``)."""

from __future__ import annotations

import logging
import os
import signal
import sys

from ..failpoints import arm_on_signal
from .base import PROCESS_NAMES, RoleArgs, set_parent_death_signal, set_process_name
from .memory_probe import start_from_env


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a key reload (SIGHUP) must not kill a role still starting
    set_parent_death_signal()
    args = RoleArgs.from_json(argv[1])
    set_process_name(PROCESS_NAMES.get(args.kind, "fd-role"))
    if os.getppid() != args.parent_pid:
        return 0  # the daemon died before the death signal was armed: nobody to serve
    logging.basicConfig(
        level=os.environ.get("FABRICD_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s [{args.role_id} pid={os.getpid()}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    arm_on_signal()
    start_from_env(args.role_id, args.kind)  # off unless FABRICD_ROLE_MEMORY_DUMP is set (benchmarks)
    if args.kind == "source_loader":
        from .source_loader import run_source_loader

        return run_source_loader(args)
    if args.kind == "constructor":
        from .constructor import run_constructor

        return run_constructor(args)
    logging.getLogger(__name__).error("unknown role kind %r", args.kind)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
