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
