"""User-facing errors. Each says what to change; tracebacks are reserved for bugs."""


class FoundryError(Exception):
    """An error the user can fix (bad input, missing file). The CLI prints it without a traceback."""

    exit_code = 1


class ConfigError(FoundryError):
    """A configuration problem found before any work starts. Exit code 2, like a usage error."""

    exit_code = 2

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class DataError(FoundryError):
    """Missing, malformed or incompatible data."""


class CheckpointError(FoundryError):
    """A checkpoint that cannot be read or written."""
