"""Errors shared by the command-line front ends (a leaf module: imports nothing of the package)."""


class UsageError(ValueError):
    """The user's command-line input cannot be served (exit status 2, one line on stderr)."""
