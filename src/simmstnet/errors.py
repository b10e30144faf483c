"""One exception type for user mistakes.

Anything a user can get wrong (a missing file, a bad field, an unknown config key) raises
:class:`UserError` with one line that names the file, line or field. The command line turns it
into ``simmstnet: error: <message>`` and exit code 2, never a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one clear line (exit code 2 on the CLI)."""
