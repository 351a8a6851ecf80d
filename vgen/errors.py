"""The one exception type for mistakes a user can fix (bad path, wrong resolution, mismatched checkpoint keys,
unknown prompt words). The CLI prints its message as a single line on stderr and exits with code 2."""


class UserError(Exception):
    """An error caused by user input. The message must say what is wrong and what to do about it."""
