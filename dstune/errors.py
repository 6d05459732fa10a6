"""The one exception type for mistakes a user can fix: the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """Bad input (config, data, paths). The message names the key or file:line at fault."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (library messages can run to pages)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def did_you_mean(name: str, known) -> str:
    """' (did you mean X?)' for the known name closest to a misspelt one, or ''."""
    import difflib
    near = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""
