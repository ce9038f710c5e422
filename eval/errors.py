"""The error an evaluation job reports to its user as a message, not a traceback."""


class UserError(Exception):
    """Bad input or a missing resource: the message names the value or the flag to fix it."""
