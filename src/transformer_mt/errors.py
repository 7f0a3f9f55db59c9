"""Errors a user can cause and fix. Entry points print them as one line and exit non-zero.

Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or configuration: the message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the key."""


class DataError(UserError):
    """A corpus file is missing, unreadable, inconsistent or fails its checksum."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the model; names the file."""
