"""Value checksums (defined with the wire format, ``memkv/protocol/checksum.py``)."""

from memkv.protocol.checksum import checksum

__all__ = ["checksum"]
