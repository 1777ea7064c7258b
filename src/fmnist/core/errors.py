"""The errors fmnist raises for what the user gave it: one base class, so that the command line prints them as
one line (exit status 2) and shows a traceback for everything else, which is a bug (exit status 1)."""
from __future__ import annotations


class FmnistError(Exception):
    """A problem with the input: a run folder, a data file, a flag or a value. The message says what to do."""


class CheckpointError(FmnistError):
    """A run folder, or one of its files, is missing, damaged or not what fmnist wrote."""


class InputError(FmnistError, ValueError):
    """A value given by the user (a flag, an option, a setting) that cannot be used; also a ValueError."""
