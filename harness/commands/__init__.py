"""`tmath` subcommands, one module each: `add_arguments(parser)` and `run(args) -> int`.

The CLI imports only the module of the command it runs (`harness.cli`), so each module imports what it
needs at the top, and `tmath predict` still starts without torch, pandas or matplotlib.
"""
