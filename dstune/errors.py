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
    same_letters = [k for k in known if k.lower() == name.lower()]  # `LoRA` for `lora`
    near = same_letters or difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


class Interrupted(UserError):
    """The job was stopped by a signal (Ctrl-C, or SIGTERM from a launcher or scheduler): one line, and the
    shell's exit code for that signal (128 + its number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignal(KeyboardInterrupt):
    """Raised in the main thread when a stop signal other than SIGINT (SIGTERM) arrives; a KeyboardInterrupt,
    so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def signal_number(stop: KeyboardInterrupt) -> int:
    """The signal behind a KeyboardInterrupt: SIGTERM's number for a StopSignal from it, else SIGINT's."""
    import signal
    return stop.signum if isinstance(stop, StopSignal) else int(signal.SIGINT)
