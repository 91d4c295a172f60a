"""Reading the pickles data sets are shared as, without letting them run code.

A pickle is a program for a small stack machine, and one of its instructions imports any global
by name and calls it: ``pickle.load`` on a crafted file runs ``os.system("...")`` with the
reader's rights before anything can be checked. The data set pickles (mini-ImageNet's
``mini-imagenet-cache-*.pkl``, tiered-ImageNet's label files) hold only dicts, lists, strings,
numbers and numpy arrays, so :func:`load_pickle` admits exactly the globals numpy needs to rebuild
its arrays, dtypes and scalars (and ``collections.OrderedDict``) and refuses every other one with
:class:`UnsafePickleError` before it is imported. No module of metagrad calls ``pickle.load`` on a
user's file; they call this.

It also tells a file that is not a pickle at all (an HTML error page a download saved under the
pickle's name, a gzip) and a truncated one apart from a generic crash, each naming the file.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy._core import multiarray as _multiarray
from numpy._core import numeric as _numeric

__all__ = [
    "NotAPickleError",
    "SafePickleError",
    "TruncatedPickleError",
    "UnsafePickleError",
    "load_pickle",
]

# (module, name) -> the object. numpy 2 pickles name ``numpy._core``, numpy 1 ``numpy.core``;
# both map to the same functions, looked up here rather than imported by name (importing
# ``numpy.core`` warns under numpy 2).
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # protocols 0-2 spell a bytes object as _codecs.encode(str, "latin1"): pure, no side effect
    ("_codecs", "encode"): codecs.encode,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _multiarray.scalar
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _numeric._frombuffer  # protocol 5 arrays


class SafePickleError(ValueError):
    """A pickle that :func:`load_pickle` will not or cannot read; ``path`` names the file."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class UnsafePickleError(SafePickleError):
    """The pickle asks for a global outside the admitted list (``os.system``, ``builtins.eval``).

    Attributes:
        path: the file.
        module, name: the refused global, e.g. ``"posix"``, ``"system"``.
    """

    def __init__(self, message: str, path: str, module: str, name: str) -> None:
        super().__init__(message, path)
        self.module, self.name = module, name


class NotAPickleError(SafePickleError):
    """The file is not a pickle: an HTML page, a gzip, or bytes no pickle starts with."""


class TruncatedPickleError(SafePickleError):
    """The pickle ends before its STOP instruction: an interrupted download or copy."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], where: str, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._where} asks for the global {module}.{name}, which a data set pickle "
                "never needs; refused without importing it (a crafted pickle runs code on "
                "load). Only numpy arrays, dtypes, scalars, dicts, lists, strings and numbers "
                "are admitted",
                self._where,
                module,
                name,
            ) from None


def _sniff(head: bytes, where: str) -> None:
    """Refuse what is recognisably not a pickle before running it."""
    stripped = head.lstrip()
    if not head:
        raise TruncatedPickleError(f"{where} is empty: the download or copy was cut off", where)
    if stripped[:1] == b"<":
        kind = (
            "an HTML page"
            if stripped[:15].lower().startswith((b"<!doctype", b"<html"))
            else ("an HTML/XML document")
        )
        raise NotAPickleError(
            f"{where} is not a pickle but {kind} (it starts with {stripped[:15]!r}): probably "
            "an error or login page a download saved under the pickle's name; fetch the file "
            "again",
            where,
        )
    if head[:2] == b"\x1f\x8b":
        raise NotAPickleError(
            f"{where} is gzip-compressed, not a pickle: decompress it first", where
        )
    if head[:2] == b"PK":
        raise NotAPickleError(f"{where} is a zip archive, not a pickle: extract it first", where)


def load_pickle(path_or_file: str | os.PathLike | IO[bytes], *, encoding: str = "ASCII") -> Any:
    """Unpickle a data set file with a restricted unpickler that cannot run code.

    ``pickle.load`` executes whatever the file says, including importing and calling
    ``os.system``; a pickle from the internet is a program. This reader admits only the globals
    that numpy arrays, dtypes and scalars and ``collections.OrderedDict`` need (dicts, lists,
    tuples, strings, bytes and numbers need none), and refuses the rest before importing them.

    Args:
        path_or_file: a path, or a binary file object (its ``name``, if any, is used in errors).
        encoding: how the 8-bit strings of a Python 2 pickle are decoded (``pickle.Unpickler``'s
            option): ``"latin1"`` for files written by Python 2 that hold numpy arrays
            (``cifar-100-python``, tiered-ImageNet's release): numpy rebuilds the array bytes
            from latin-1 text exactly; ``"bytes"`` keeps them as bytes. It changes no rule about
            which globals are admitted.

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: the pickle asks for any other global (``os.system``, ``eval``, ...).
        NotAPickleError: an HTML page, gzip, zip or other bytes that are not a pickle.
        TruncatedPickleError: the file is empty or ends early.
        FileNotFoundError: no such file.

    Example:
        >>> import io, pickle
        >>> data = pickle.dumps({"image_data": np.zeros((2, 3), np.uint8), "ids": ["n01"]})
        >>> load_pickle(io.BytesIO(data))["image_data"].shape
        (2, 3)
        >>> load_pickle(io.BytesIO(pickle.dumps(print)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.safe_pickle.UnsafePickleError: <stream> asks for the global builtins.print...
    """
    if isinstance(path_or_file, str | os.PathLike):
        with open(Path(path_or_file).expanduser(), "rb") as f:
            return _load(f, str(path_or_file), encoding)
    return _load(path_or_file, str(getattr(path_or_file, "name", "<stream>")), encoding)


def _load(file: IO[bytes], where: str, encoding: str) -> Any:
    if file.seekable():
        start = file.tell()
        head = file.read(64)
        file.seek(start)
    else:
        file = io.BufferedReader(file)  # type: ignore[arg-type]
        head = file.peek(64)[:64]
    _sniff(head, where)
    try:
        return _RestrictedUnpickler(file, where, encoding).load()
    except SafePickleError:
        raise
    except EOFError as err:
        raise TruncatedPickleError(
            f"{where} ends before the pickle does: the download or copy was cut off", where
        ) from err
    except pickle.UnpicklingError as err:
        if "truncated" in str(err):
            raise TruncatedPickleError(
                f"{where} is truncated ({err}): the download or copy was cut off", where
            ) from err
        raise NotAPickleError(f"{where} is not a readable pickle ({err})", where) from err
    except UnicodeDecodeError as err:
        raise NotAPickleError(
            f"{where} holds Python 2 strings that are not {encoding} ({err}); a Python 2 pickle "
            "of numpy arrays is read with encoding='latin1'",
            where,
        ) from err
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, MemoryError) as err:
        raise NotAPickleError(
            f"{where} is a corrupt pickle ({type(err).__name__}: {err})", where
        ) from err
