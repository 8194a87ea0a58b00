"""Errors that mean "bad input": the CLI prints them as one line and exits with code 2."""


class MedpeftError(Exception):
    """Base class of the errors a user can fix by changing their input."""


class ConfigError(MedpeftError):
    """A config key is unknown, mistyped or missing."""


class DataError(MedpeftError):
    """A benchmark file or record is malformed.

    The message always names the file, the line or record key, and the field.
    """

    def __init__(self, path: object, where: object, field: str | None, problem: str):
        self.path, self.where, self.field, self.problem = str(path), where, field, problem
        loc = f"{path}: {where}"
        if field:
            loc += f": field '{field}'"
        super().__init__(f"{loc}: {problem}")
