"""The one exception type for mistakes in what the user gave us.

Library code raises :class:`UserError` with a message that names the value and the fix; only the
CLI turns it into ``wecolora: error: ...`` and exit status 2.
"""


class UserError(ValueError):
    """Bad input from the user (paths, ranges, models). The message is shown as-is."""
