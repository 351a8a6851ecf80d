"""The one exception type for mistakes a user can fix (bad path, wrong resolution, mismatched checkpoint keys,
unknown prompt words), and how such a message quotes what the user gave. The CLI prints the message as a single line
on stderr and exits with code 2."""


class UserError(Exception):
    """An error caused by user input. The message must say what is wrong and what to do about it."""


def excerpt(text: str, limit: int = 60) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters (a 12 KB prompt is not repeated whole)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
