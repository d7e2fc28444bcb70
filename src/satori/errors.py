"""One exception type for every problem the user can fix.

The CLI prints ``SatoriError`` as a single line (``satori: error: ...``) and exits with
status 2; anything else is a bug and keeps its traceback.
"""


class SatoriError(Exception):
    """A user-facing error: bad input, bad configuration, missing file."""
