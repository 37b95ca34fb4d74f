"""User-facing errors: the CLI prints ``error: <message>`` on one line and exits with status 2."""

# what a failed allocation asked for: one rule, fastconv's (its benchmark's CLI, standalone, says it too)
from fastconv import out_of_memory  # noqa: F401


class ErfLabError(Exception):
    """A mistake in the user's input (unknown model, bad checkpoint, empty folder, ...).

    The message must be one clear line that says what is wrong and, where possible, how to fix it.
    """

    #: raised alike by every process of a torchrun job (a decision they share): the CLI prints it once per node
    every_rank: bool = False


def on_every_rank(error):
    """``error`` (an ErfLabError, or a KeyboardInterrupt: Ctrl-C reaches every process), marked as raised alike on
    every rank (:attr:`ErfLabError.every_rank`): the CLI prints it in the first process of each node only
    (``LOCAL_RANK`` 0: each node's console gets the line once), not once per process."""
    error.every_rank = True
    return error


def printed_here(error: BaseException) -> bool:
    """Whether this process prints ``error`` under torchrun: the first process of each node (``LOCAL_RANK`` 0)
    always; the others every error but one every rank raised alike (:func:`on_every_rank`: they all met in a
    collective, so the first process raised it too). An error where the ranks cannot meet (an unparsable command
    line, an unusable device, a process that cannot join) is printed by every process: nothing tells that the first
    process got as far (it may start seconds later, and torchrun ends it as soon as another process has exited); the
    options' checks wait for the ranks to meet (``erf_lab.erf.distributed.checked_together``). Outside torchrun:
    always."""
    import os

    try:
        world = world_size_from_env()
    except ErfLabError:  # the error being reported may be that one: said by this process
        return True
    if world <= 1 or os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        return True
    return not getattr(error, "every_rank", False)


class NodeWarning(UserWarning):
    """A warning about what every process of a node meets alike (its image folder's unreadable and foreign files):
    under torchrun the CLI says it in each node's first process (:func:`said_here`)."""


class RankWarning(UserWarning):
    """A warning about one process's own share of a torchrun job (an image of its batches it could not read): said
    by the process that met it (:func:`said_here`)."""


def said_here(category: type = UserWarning) -> bool:
    """Whether this process says a note or warning of ``category`` under torchrun: one about the job, which every
    rank meets alike (the weights loaded, an option overridden, random weights, a finished run), rank 0 alone (before:
    once per process); a :class:`NodeWarning` the first process of each node (``LOCAL_RANK``; without it, as
    ``erf_lab.erf.distributed.env_info`` takes it, ``RANK``); a :class:`RankWarning` every process. Outside
    torchrun, or where the variables are no integers: always."""
    import os

    if issubclass(category, RankWarning):
        return True
    try:
        if world_size_from_env() <= 1:
            return True
        rank = int_from_env("RANK", 0, "the process's number")
        if issubclass(category, NodeWarning) and "LOCAL_RANK" in os.environ:
            rank = int_from_env("LOCAL_RANK", 0, "the process's number on its node")
    except ErfLabError:  # the error the command reports: said by this process
        return True
    return rank == 0


def world_size_from_env() -> int:
    """torchrun's ``WORLD_SIZE`` (1 when unset or empty); ErfLabError (one line) when it is not an integer."""
    return int_from_env("WORLD_SIZE", 1, "the number of processes")


def int_from_env(name: str, default: int, meaning: str) -> int:
    """The integer in the environment variable ``name`` (torchrun's: ``meaning`` says what it sets it to);
    ``default`` when unset or blank, ErfLabError (one line) when it is not an integer."""
    import os

    text = os.environ.get(name, "").strip()
    try:
        return int(text) if text else default
    except ValueError:
        raise ErfLabError(f"{name}={text!r} is not an integer: torchrun sets it to {meaning}; "
                          f"unset it to run in one process") from None


class CheckpointError(ErfLabError):
    """A checkpoint file that cannot be loaded safely or does not match the model."""


class FolderInUseError(ErfLabError):
    """A result folder another erf-lab process writes into now (:func:`erf_lab.io.hold_folder`); ``folder`` is that
    folder, as given. The message is the CLI's (it names the option, e.g. ``--out``); the app, which has no options,
    says it in its own terms (``app.ui.guard``)."""

    def __init__(self, message: str, folder=None):
        super().__init__(message)
        self.folder = folder


#: what the CLI and the app say after a failed allocation
OUT_OF_MEMORY_HINT = "choose smaller sizes, a smaller batch or fewer images"
