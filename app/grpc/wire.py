"""A gRPC message's size in parsed objects, counted from its wire bytes before protobuf parses it.

A protobuf message costs far more once parsed than on the wire: an empty repeated sub-message is two
bytes on the wire and an object in memory (a 64 MiB ``ModelInferRequest`` of empty ``outputs`` costs
~1.5 GB in the parser), a packed varint one byte and eight. :func:`check_message` walks the wire
format along the message's descriptor (sub-messages and map entries included, without recursion),
counting every field and every number of a packed varint field, and stops with
:class:`~app.core.errors.RequestTooComplex` at the first one over ``limit`` (``max_request_elements``).
Bytes that are not valid wire format stop the walk: protobuf's own parse then names the error.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from app.core.errors import RequestTooComplex

_HIGH = bytes(range(0x80, 0x100))
"""Continuation bytes of a varint: deleting them leaves one byte per number."""
_VARINT_TYPES = frozenset({
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM,
})  # fmt: skip


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(buf) and shift < 64:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
    return -1, len(buf) + 1  # truncated or over-long: not wire format


def check_message(data: bytes | memoryview, descriptor: Descriptor, limit: int, what: str) -> None:
    """Refuse ``data`` (a serialized ``descriptor`` message) holding more than ``limit`` fields and packed numbers."""
    count = 0
    stack = [(memoryview(data), descriptor)]
    while stack:
        buf, desc = stack.pop()
        i, n = 0, len(buf)
        while i < n:
            key, i = _varint(buf, i)
            count += 1
            if count > limit:
                raise RequestTooComplex(f"{what} holds over {limit} fields and values (max_request_elements)")
            wire = key & 7
            if wire == 0:
                _, i = _varint(buf, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                length, i = _varint(buf, i)
                if length < 0 or i + length > n:
                    return
                field = desc.fields_by_number.get(key >> 3)
                segment = buf[i : i + length]
                i += length
                if field is None:
                    continue  # unknown field: kept as its bytes
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    stack.append((segment, field.message_type))
                elif field.type in _VARINT_TYPES:  # packed repeated numbers: one per final byte
                    count += len(segment.tobytes().translate(None, _HIGH))
                    if count > limit:
                        raise RequestTooComplex(f"{what} holds over {limit} fields and values (max_request_elements)")
            else:
                return  # groups (deprecated) or not wire format
            if i > n:
                return
