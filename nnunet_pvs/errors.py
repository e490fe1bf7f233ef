"""The one error type every module may raise for bad user input (kept apart so nothing imports the CLI)."""


class UserError(Exception):
    """Bad input from the user: printed as one clear line, exit code 2, no traceback."""
