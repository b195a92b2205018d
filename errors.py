"""The one exception type for problems a user causes and can fix.

Everything that a user's command, config, data or workdir can get wrong is raised as a
`UserError` (or a subclass) whose message names the bad value and the fix. `main.py` catches
exactly this type and prints the message as one line, without a traceback; anything else is a
bug or a crash and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the bad value and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user must provide is missing (weights, a checkpoint, event
    files); the message says how to get it."""


class ConfigError(UserError, ValueError):
    """A config value, or a combination of values, that cannot work; the message names the
    field and the fix. (config_lib.validate raises it before anything is built; functions
    below the boundary raise it for the same rules when called with such values.)"""
