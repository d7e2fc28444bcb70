"""One exception type for every problem the user can fix.

The CLI prints ``SatoriError`` as a single line (``satori: error: ...``) and exits with
status 2; anything else is a bug and keeps its traceback.
"""


class SatoriError(Exception):
    """A user-facing error: bad input, bad configuration, missing file."""


class Stopped(SatoriError):
    """A run stopped on request (SIGTERM / SIGINT) after writing a checkpoint; ``--resume``
    continues it. The CLI exits with ``128 + signum`` (143 for SIGTERM), not 2."""

    def __init__(self, message: str, signum: int = 0):
        super().__init__(message)
        self.signum = signum
