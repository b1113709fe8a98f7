"""Reading a serialized ChatEvent without parsing it: the router relays events as bytes
and needs only their kind, and numbers them by appending their ``seq``."""

from __future__ import annotations

# ChatEvent field numbers of the ``kind`` oneof (see types.proto).
KIND_DELTA = 10
KIND_TOOL_CALL = 11
KIND_TOOL_RESULT = 12
KIND_HANDOFF = 13
KIND_FINAL = 14
KIND_ERROR = 15
KIND_APPROVAL = 18


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def peek_kind(data: bytes) -> int:
    """The field number of a serialized ChatEvent's ``kind`` (0 when it has none).

    Walks the top-level fields without parsing them: agent, seq, conversation_id and
    turn_id come first, then the one ``kind`` field.
    """
    pos, size = 0, len(data)
    try:
        while pos < size:
            tag, pos = _varint(data, pos)
            number, wire = tag >> 3, tag & 7
            if number >= KIND_DELTA:
                return number
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 2:
                length, pos = _varint(data, pos)
                pos += length
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                return 0
    except IndexError:
        return 0
    return 0


def encode_seq(seq: int) -> bytes:
    """``seq`` (field 2) as bytes to append to a serialized ChatEvent (last one wins)."""
    out = bytearray(b"\x10")
    while True:
        byte = seq & 0x7F
        seq >>= 7
        if seq:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
