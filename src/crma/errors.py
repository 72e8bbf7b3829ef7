"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (a path, a file's content, an option). Message is one line."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one line, for a one-line error naming its cause."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__
