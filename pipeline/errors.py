"""Errors a user can cause. The CLI prints them as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """Something the user can fix: a bad config, a missing file, an unwritable directory."""
