"""User-facing errors: the CLI prints ``error: <message>`` on one line and exits with status 2."""


class ErfLabError(Exception):
    """A mistake in the user's input (unknown model, bad checkpoint, empty folder, ...).

    The message must be one clear line that says what is wrong and, where possible, how to fix it.
    """

    #: raised alike by every process of a torchrun job (a decision they share): the CLI prints it once per node
    every_rank: bool = False


def on_every_rank(error: ErfLabError) -> ErfLabError:
    """``error``, marked as raised alike on every rank (:attr:`ErfLabError.every_rank`): the CLI prints it in the
    first process of each node only (``LOCAL_RANK`` 0: each node's console gets the line once), not once per
    process."""
    error.every_rank = True
    return error


def printed_here(error: BaseException) -> bool:
    """Whether this process prints ``error`` under torchrun: the first process of each node (``LOCAL_RANK`` 0)
    always; the others every error but one every rank raised alike (:func:`on_every_rank`: they all met in a
    collective, so the first process raised it too). An error before the ranks meet (a check of the options and the
    node) is printed by every process: nothing tells that the first process got as far (it may start seconds later,
    and torchrun ends it as soon as another process has exited). Outside torchrun: always."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        return True
    return not getattr(error, "every_rank", False)


class CheckpointError(ErfLabError):
    """A checkpoint file that cannot be loaded safely or does not match the model."""


#: what the CLI and the app say after a failed allocation
OUT_OF_MEMORY_HINT = "choose smaller sizes, a smaller batch or fewer images"


def out_of_memory(e: BaseException) -> str | None:
    """What an allocation that failed asked for ("602.1 GB requested", "on the GPU"), or None for any other
    error. torch's CPU allocator raises a RuntimeError, CUDA's an OutOfMemoryError (a RuntimeError)."""
    import re

    text = str(e)
    if isinstance(e, MemoryError):
        return "Python could not allocate"
    if not isinstance(e, RuntimeError):
        return None
    if type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text or "MPS backend out of memory" in text:
        return "on the GPU"
    if "DefaultCPUAllocator" not in text and "can't allocate memory" not in text:
        return None
    n = re.search(r"allocate (\d+) bytes", text)
    return f"{int(n.group(1)) / 1e9:.1f} GB requested" if n else "the CPU allocator failed"
