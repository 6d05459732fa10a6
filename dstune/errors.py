"""The one exception type for mistakes a user can fix: the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """Bad input (config, data, paths). The message names the key or file:line at fault."""

    exit_code = 2
