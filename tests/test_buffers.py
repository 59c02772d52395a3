"""Receiving straight into new bytes objects (client/buffers.py)."""

from __future__ import annotations

import os

import numpy as np

from memkv.client.buffers import byte_view, finish_bytes, new_bytes


def test_large_values_are_filled_in_place_as_real_bytes():
    data = os.urandom(1 << 20)
    obj, view = new_bytes(len(data))
    assert view.nbytes == len(data) and not view.readonly
    view[:] = data
    del view
    value = finish_bytes(obj)
    assert value is obj and isinstance(value, bytes)  # no copy for large values
    assert value == data and hash(value) == hash(bytes(data)) and len(value) == len(data)


def test_small_values_use_a_bytearray_then_bytes():
    obj, view = new_bytes(100)
    view[:] = b"x" * 100
    value = finish_bytes(obj)
    assert isinstance(value, bytes) and value == b"x" * 100


def test_byte_view_of_arrays_is_flat_and_shares_memory():
    arr = np.zeros((4, 8), dtype=np.float16)
    view = byte_view(arr, writable=True)
    assert view.nbytes == 64 and view.format == "B"
    view[:2] = b"\x00\x3c"  # 1.0 in float16, little endian
    assert arr[0, 0] == 1.0
