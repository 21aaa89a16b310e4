"""The error raised when a dataset's files are not where they were looked for."""


class DatasetMissing(FileNotFoundError):
    """A dataset is not on disk (and could not be downloaded); the message says what and where."""
