"""The error an evaluation job reports to its user as a message, not a traceback."""


class UserError(Exception):
    """Bad input or a missing resource: the message names the value or the flag to fix it."""


OFFLINE_HINT = "or run the offline miniature with --preset smoke"
"""How every missing-resource message ends: the way to run without the resource."""
