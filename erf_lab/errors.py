"""User-facing errors: the CLI prints ``error: <message>`` on one line and exits with status 2."""


class ErfLabError(Exception):
    """A mistake in the user's input (unknown model, bad checkpoint, empty folder, ...).

    The message must be one clear line that says what is wrong and, where possible, how to fix it.
    """


class CheckpointError(ErfLabError):
    """A checkpoint file that cannot be loaded safely or does not match the model."""
