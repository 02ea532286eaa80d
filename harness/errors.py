"""Errors a user can fix: reported as one line `tmath: error: ...` with exit status 2."""


class UsageError(ValueError):
    """Bad input (unknown model, impossible layout, malformed file, missing device)."""


EXIT_USAGE = 2
