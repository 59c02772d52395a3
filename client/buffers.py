"""Turning user objects (bytes, bytearray, numpy arrays, torch CPU tensors) into byte views."""

from __future__ import annotations

from typing import Any

from memkv.errors import InvalidArgument


def byte_view(obj: Any, *, writable: bool = False) -> memoryview:
    """A flat ``B``-format memoryview over ``obj``'s memory, never a copy."""
    if hasattr(obj, "numpy") and hasattr(obj, "is_contiguous"):  # a torch tensor
        if getattr(obj, "device", None) is not None and str(obj.device) != "cpu":
            raise InvalidArgument("only CPU tensors can be used as buffers")
        if not obj.is_contiguous():
            raise InvalidArgument("tensor buffers must be contiguous")
        import torch

        # Through uint8 so that dtypes numpy lacks (bfloat16) work too.
        obj = obj.detach().reshape(-1).view(torch.uint8).numpy()
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidArgument(f"{type(obj).__name__} does not expose a buffer") from None
    if not view.c_contiguous:
        raise InvalidArgument("buffers must be C-contiguous")
    if writable and view.readonly:
        raise InvalidArgument("buffer is read-only")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


# --- receiving straight into a new ``bytes`` object -------------------------------------------
# ``get`` must return ``bytes``. Receiving into a bytearray and then copying it
# into bytes costs a second allocation and a copy; for large values the page
# faults of that second fresh allocation dominate (a 1 MiB GET took 3x as long
# as ``get_into``). CPython's own C code builds bytes in place with
# PyBytes_FromStringAndSize(NULL, n) and fills them before anyone else sees the
# object; we do the same, and only for values large enough to matter.

_IN_PLACE_MIN = 32 * 1024


def _in_place_factory() -> Any:
    import ctypes
    import platform
    import sys

    if platform.python_implementation() != "CPython":
        return None
    new = ctypes.pythonapi.PyBytes_FromStringAndSize
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    offset = sys.getsizeof(b"") - 1  # where ob_sval starts in a bytes object

    def make(n: int) -> tuple[bytes, memoryview]:
        b = new(None, n)
        return b, memoryview((ctypes.c_char * n).from_address(id(b) + offset)).cast("B")

    b, view = make(4)
    view[:] = b"memk"
    return make if b == b"memk" else None


_make_in_place = _in_place_factory()


def new_bytes(n: int) -> tuple[bytes | bytearray, memoryview]:
    """A fresh value of ``n`` bytes and a writable view to receive it into.

    The caller must fill the view completely before handing the object out and
    must drop the view afterwards. Small values (and non-CPython) get a
    bytearray, which the caller converts with ``bytes()``.
    """
    if n >= _IN_PLACE_MIN and _make_in_place is not None:
        return _make_in_place(n)
    buf = bytearray(n)
    return buf, memoryview(buf)


def finish_bytes(obj: bytes | bytearray) -> bytes:
    return obj if isinstance(obj, bytes) else bytes(obj)
