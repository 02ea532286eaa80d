"""Run the configuration and measure every term next to its prediction (one record, `harness.launch`)."""

from __future__ import annotations

import json
import sys

from harness import progress
from harness.display.measurement import print_measurement
from harness.distributed import LAUNCHERS, hostfile_nodes
from harness.errors import UsageError
from harness.flags import add_run_settings, spec_from_args
from harness.launch import LaunchOptions, Limits, launch
from harness.processes import terminate_as_interrupt
from harness.results import append_record, check_writable
from harness.trainers import check_measurable, resolve_device

SECTIONS = ("model", "training", "parallel", "budget", "measurement")


def add_arguments(p) -> None:
    add_run_settings(p, SECTIONS)
    g = p.add_argument_group("launch and output")
    g.add_argument("--timeout", type=float, metavar="S", help="seconds before the run is killed (status timeout)")
    g.add_argument("--launcher", choices=LAUNCHERS,
                   help="starts the ranks of a --zero/--gpus run (default torchrun, one node)")  # fmt: skip
    g.add_argument(
        "--hostfile", metavar="FILE", help="DeepSpeed hostfile for several nodes (with --launcher deepspeed)"
    )
    g.add_argument("--out", metavar="FILE", help="append the record to this JSONL file")
    g.add_argument("--format", default="table", choices=("table", "json"))
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args) -> int:
    given = {}
    if args.hostfile:
        nodes = len(hostfile_nodes(args.hostfile))
        if args.nodes is not None and args.nodes != nodes:
            raise UsageError(f"--nodes {args.nodes} contradicts the {nodes} hosts of {args.hostfile}")
        given["nodes"] = nodes
    elif args.nodes not in (None, 1):
        raise UsageError(f"--nodes {args.nodes}: ranks on several nodes start from a --hostfile (--launcher deepspeed)")
    spec = spec_from_args(args, **given)
    limits = Limits(timeout_s=args.timeout)
    options = LaunchOptions(launcher=args.launcher or "torchrun", hostfile=args.hostfile)
    check_measurable(spec, resolve_device(spec.measurement.device))
    options.check(spec)
    out = check_writable(args.out) if args.out else None
    with terminate_as_interrupt():
        record = launch(spec, limits, options, argv=sys.argv, progress=None if args.quiet else progress.to_stderr)
    if out is not None:
        append_record(out, record)
    if args.format == "json":
        print(json.dumps(record.to_dict(), indent=2))
    else:
        print_measurement(record)
    return 0 if record.status == "ok" else 1
