"""The one error type a user sees: a one-line message, no traceback (see cli.main)."""


class HoneError(Exception):
    """A mistake that stops the job: bad recipe field, missing file, missing data package.

    The message is one line and names the file, field or line at fault; the CLI prints it
    as ``error: <message>`` and exits with status 2.
    """
