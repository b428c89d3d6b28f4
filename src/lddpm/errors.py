"""The one exception type for mistakes a user can fix (bad config, missing data, corrupt file)."""


class LddpmError(Exception):
    """An error caused by user input; the CLI prints its message without a traceback."""
