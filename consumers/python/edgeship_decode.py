"""Decode edgeship frames ("ESHP" versions 1 to 3) in Python consumers: AWS Lambda, KCL, scripts.

An edgeship frame is what the agent puts in one Kinesis record (or one file of a ``directory``
destination): a header naming the gateway, then many MQTT messages, usually zstd-compressed.
FORMAT.md at the root of the edgeship repository specifies it byte for byte; this module
follows ``agent/frame.rs``, the reference decoder, check for check.

Public API
----------
``decode_frame(data) -> Frame``
    Decodes one frame (bytes-like). ``Frame.gateway`` is the gateway id and ``Frame.records``
    a list of ``Record`` with the fields ``edgeship decode`` prints: ``id`` (``"<gateway>:<seq>"``,
    stable across redeliveries), ``seq``, ``gateway``, ``topic``, ``ts_ms`` (milliseconds since
    the Unix epoch, UTC) and ``payload`` (the MQTT payload, ``bytes``).

``iter_kinesis_event(event) -> Iterator[Record]``
    The records of every frame in a Lambda Kinesis event (``event["Records"][i]["kinesis"]["data"]``
    is base64), in order.

``json_line(record) -> str``
    The JSON line ``edgeship decode`` prints for a record.

``FrameError``
    A ``ValueError`` raised for any malformed input, with a message saying what is wrong: bad
    magic, unknown version or flags, truncation, a body larger than ``MAX_BODY_BYTES``, zstd
    errors (including a checksum mismatch), record count or length mismatches, non-UTF-8
    gateway or topic, bad base64. Decoding never allocates from an unchecked length: a
    compressed body is decompressed block by block and refused as soon as it outgrows the size
    its header declares.

Command line
------------
``python3 edgeship_decode.py [FILE...]`` (or ``python3 -m edgeship_decode``) prints exactly
what ``edgeship decode`` prints: one JSON line per message, keys sorted, payload as text when it
is UTF-8 and as ``payload_base64`` otherwise. No file, or only ``-``, reads stdin. Each input
is a raw frame, or text holding base64 records separated by whitespace (as ``aws kinesis
get-records`` prints them). Exit status: 0 when everything decoded, 3 when some record did not
(it is reported on stderr and the others are still printed), 1 when an input cannot be read,
2 for bad arguments.

Requires Python 3.9+ and the ``zstandard`` package.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Tuple, Union

import zstandard

__all__ = [
    "MAX_BODY_BYTES",
    "Frame",
    "FrameError",
    "Record",
    "decode_frame",
    "iter_frame",
    "iter_kinesis_event",
    "json_line",
    "main",
]

MAGIC = b"ESHP"
#: Version 1: records of one partition key. Version 2: each record carries its own key.
#: Version 3: version 2's records in two sections (an index, then the payloads).
VERSIONS = (1, 2, 3)
FLAG_ZSTD = 0x01
#: Largest uncompressed body accepted, as in agent/frame/mod.rs.
MAX_BODY_BYTES = 256 << 20
#: A compressed body may claim at most this many times its own size (and 1 MiB whatever its
#: size): memory follows what the input can hold, not what its header says.
MAX_EXPANSION = 4096
#: Most records ``decode_frame`` holds at once; ``iter_frame`` yields any number.
MAX_COLLECTED_RECORDS = 1 << 20

_U64_MASK = (1 << 64) - 1
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SKIPPABLE_MAGIC_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50
_RLE_BLOCK = 1
_RESERVED_BLOCK = 3
# The largest window libzstd accepts on 64-bit platforms; the agent's decoder has no lower limit.
_MAX_WINDOW_BYTES = 1 << 31
# What Rust's str::split_whitespace splits on (Unicode White_Space). Python's str.split() also
# splits on U+001C..U+001F, so the CLI uses this instead to split base64 input the same way.
_WHITESPACE = re.compile(
    "[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
)
_PROG = "edgeship_decode"


class FrameError(ValueError):
    """The input is not a valid edgeship frame; the message says why."""


@dataclass(frozen=True)
class Record:
    """One MQTT message. ``id`` is ``"<gateway>:<seq>"``: the same on every redelivery."""

    id: str
    seq: int
    gateway: str
    topic: str
    ts_ms: int
    payload: bytes
    #: The record's partition key (version 2 frames); empty in version 1 frames, whose one
    #: key is the Kinesis record's.
    key: str = ""


@dataclass(frozen=True)
class Frame:
    """A decoded frame: the gateway that sent it and its records, in frame order."""

    gateway: str
    records: List[Record]


def _truncated(what: str) -> FrameError:
    return FrameError(f"frame is truncated: {what}")


def _corrupt(what: str) -> FrameError:
    return FrameError(f"frame body is corrupt: {what}")


def decode_frame(data: Union[bytes, bytearray, memoryview]) -> Frame:
    """Decodes one frame, checking every length and the whole body (its zstd checksum) before
    returning; raises FrameError for anything malformed. At most ``MAX_COLLECTED_RECORDS``
    records: ``iter_frame`` yields any number."""
    gateway, count, body, version = _open_frame(data)
    if count > MAX_COLLECTED_RECORDS:
        raise _corrupt(
            f"{count} records is more than {MAX_COLLECTED_RECORDS} to hold at once;"
            " read it as a stream"
        )
    return Frame(gateway, list(_iter_records(gateway, body, count, version)))


def iter_frame(data: Union[bytes, bytearray, memoryview]) -> Iterator[Record]:
    """Yields a frame's records one at a time: only one ``Record`` is held at once, whatever
    the header claims (the body, at most ``MAX_BODY_BYTES`` and ``MAX_EXPANSION`` times the
    input, is checked whole first). Raises FrameError as ``decode_frame`` does."""
    gateway, count, body, version = _open_frame(data)
    return _iter_records(gateway, body, count, version)


def _open_frame(data: Union[bytes, bytearray, memoryview]) -> Tuple[str, int, Any, int]:
    """Checks a frame's header and returns its gateway, record count, uncompressed body (for
    version 3, its index and payload sections) and version."""
    data = bytes(data)
    if len(data) < 4 or data[:4] != MAGIC:
        raise FrameError("not an edgeship frame (magic bytes missing)")
    if len(data) < 7:
        raise _truncated("header")
    version, flags, gateway_len = data[4], data[5], data[6]
    if version not in VERSIONS:
        raise FrameError(
            f"frame version {version} is not supported (this build reads versions 1, 2 and 3)"
        )
    if flags & ~FLAG_ZSTD:
        raise FrameError(f"unknown frame flags {flags:#04x}")
    pos = 7 + gateway_len
    if pos > len(data):
        raise _truncated("gateway id")
    try:
        gateway = data[7:pos].decode("utf-8")
    except UnicodeDecodeError:
        raise _corrupt("gateway id is not UTF-8") from None
    if pos + 8 > len(data):
        raise _truncated("counts")
    count, body_len = struct.unpack_from("<II", data, pos)
    rest = data[pos + 8 :]
    if body_len > MAX_BODY_BYTES:
        raise FrameError(f"frame body of {body_len} bytes exceeds the {MAX_BODY_BYTES}-byte limit")
    compressed = bool(flags & FLAG_ZSTD)
    if compressed and body_len > max(len(rest) * MAX_EXPANSION, 1 << 20):
        raise _corrupt(
            f"a body of {body_len} bytes cannot come from {len(rest)} compressed bytes"
            f" (at most {MAX_EXPANSION} times as many)"
        )
    if version == 3:
        body = _open_sections(rest, body_len, compressed)
        # An index entry takes at least 5 bytes: a count beyond that is corrupt.
        if count > len(body[0]) // 5 + 1:
            raise _corrupt(f"{count} records cannot fit in an index of {len(body[0])} bytes")
        return gateway, count, body, version
    if compressed:
        body = _decompress_exact(rest, body_len)
    elif len(rest) != body_len:
        raise _truncated("body")
    else:
        body = rest
    # A record takes at least 4 bytes: a count beyond that is corrupt, whatever follows.
    if count > len(body) // 4 + 1:
        raise _corrupt(f"{count} records cannot fit in {len(body)} bytes")
    return gateway, count, body, version


def _open_sections(rest: bytes, body_len: int, compressed: bool) -> Tuple[bytes, bytes]:
    """A version 3 body's index and payload sections, uncompressed and checked against the
    lengths the frame declares."""
    if len(rest) < 8:
        raise _truncated("section lengths")
    index_len, stored = struct.unpack_from("<II", rest, 0)
    if index_len > body_len:
        raise _corrupt(f"an index of {index_len} bytes in a body of {body_len}")
    if not compressed and stored != index_len:
        raise _corrupt(f"an uncompressed index stored in {stored} bytes, {index_len} long")
    rest = rest[8:]
    if stored > len(rest):
        raise _truncated("index section")
    index, payloads = rest[:stored], rest[stored:]
    if compressed:
        return (
            _decompress_exact(index, index_len),
            _decompress_exact(payloads, body_len - index_len),
        )
    if len(payloads) != body_len - index_len:
        raise _truncated("payload section")
    return index, payloads


def _iter_records(gateway: str, body: Any, count: int, version: int) -> Iterator[Record]:
    """Parses ``count`` records from an uncompressed body that must end right after them."""
    if version == 3:
        yield from _iter_sections(gateway, body[0], body[1], count)
        return
    pos = 0
    for _ in range(count):
        seq, pos = _read_varint(body, pos)
        ts_ms, pos = _read_varint(body, pos)
        key_text = ""
        if version == 2:
            key, pos = _read_field(body, pos)
            key_text = _text(key, "key")
        topic, pos = _read_field(body, pos)
        topic_text = _text(topic, "topic")
        payload, pos = _read_field(body, pos)
        yield Record(f"{gateway}:{seq}", seq, gateway, topic_text, ts_ms, payload, key_text)
    if pos != len(body):
        raise _corrupt(f"{len(body) - pos} bytes after the last record")


def _unzigzag(value: int) -> int:
    """The signed difference a zigzag varint holds, as a 64-bit two's complement number."""
    return (value >> 1) ^ (_U64_MASK if value & 1 else 0)


def _iter_sections(gateway: str, index: bytes, payloads: bytes, count: int) -> Iterator[Record]:
    """Parses ``count`` records from a version 3 body's index and payload sections; each must
    end right after them. Ids and times are differences from the record before, wrapping."""
    pos = at = seq = ts_ms = 0
    for _ in range(count):
        delta, pos = _read_varint(index, pos)
        seq = (seq + _unzigzag(delta)) & _U64_MASK
        delta, pos = _read_varint(index, pos)
        ts_ms = (ts_ms + _unzigzag(delta)) & _U64_MASK
        key, pos = _read_field(index, pos)
        topic, pos = _read_field(index, pos)
        length, pos = _read_varint(index, pos)
        if at + length > len(payloads):
            raise _truncated("payload beyond the payload section")
        payload = payloads[at : at + length]
        at += length
        yield Record(
            f"{gateway}:{seq}",
            seq,
            gateway,
            _text(topic, "topic"),
            ts_ms,
            payload,
            _text(key, "key"),
        )
    if pos != len(index):
        raise _corrupt(f"{len(index) - pos} bytes after the last index entry")
    if at != len(payloads):
        raise _corrupt(f"{len(payloads) - at} bytes after the last payload")


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _corrupt(f"{what} is not UTF-8") from None


def _read_varint(body: bytes, pos: int) -> Tuple[int, int]:
    """Reads an unsigned LEB128 value of at most 10 bytes; bits past the 64th are dropped."""
    value = 0
    for shift in range(0, 64, 7):
        if pos >= len(body):
            raise _truncated("varint")
        byte = body[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _U64_MASK, pos
    raise _corrupt("varint longer than 10 bytes")


def _read_field(body: bytes, pos: int) -> Tuple[bytes, int]:
    """Reads a varint length and that many bytes."""
    length, pos = _read_varint(body, pos)
    end = pos + length
    if end > len(body):
        raise _truncated("field length beyond the body")
    return body[pos:end], end


def _decompress_exact(data: bytes, expected_len: int) -> bytes:
    """Decompresses a body whose content must be exactly ``expected_len`` bytes.

    Accepts what the agent's decoder (libzstd's one-shot ZSTD_decompressDCtx) accepts: zstd
    frames back to back, skippable frames among them, nothing else after them; the content of
    all frames together is the body. One difference: the one-shot decoder also accepts a raw
    or RLE block larger than RFC 8878's block maximum (128 KiB at most), which the streaming
    decoder used here refuses. No zstd encoder writes such blocks.
    """
    if expected_len > MAX_BODY_BYTES:
        raise FrameError(
            f"frame body of {expected_len} bytes exceeds the {MAX_BODY_BYTES}-byte limit"
        )
    decompressor = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW_BYTES)
    out = bytearray()
    pos = 0
    # Like libzstd: a frame starts only where at least 5 bytes remain; fewer is an error.
    while len(data) - pos >= 5:
        magic = int.from_bytes(data[pos : pos + 4], "little")
        if magic & _SKIPPABLE_MAGIC_MASK == _SKIPPABLE_MAGIC:
            if len(data) - pos < 8:
                raise FrameError("zstd: skippable frame is truncated")
            pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little")
            if pos > len(data):
                raise FrameError("zstd: skippable frame is truncated")
            continue
        try:
            pos = _inflate_zstd_frame(decompressor, data, pos, out, expected_len)
        except zstandard.ZstdError as err:
            reason = str(err).removeprefix("zstd decompressor error: ")
            raise FrameError(f"zstd: {reason}") from None
    if pos != len(data):
        raise FrameError(f"zstd: {len(data) - pos} bytes after the last zstd frame")
    if len(out) != expected_len:
        raise _corrupt(f"body decompressed to {len(out)} bytes, header says {expected_len}")
    return bytes(out)


def _inflate_zstd_frame(
    decompressor: zstandard.ZstdDecompressor,
    data: bytes,
    pos: int,
    out: bytearray,
    capacity: int,
) -> int:
    """Appends the content of the zstd frame at ``data[pos:]`` to ``out``; returns its end.

    Walks the frame's block headers (RFC 8878, section 3.1.1) only to find where blocks end,
    and feeds libzstd one block at a time, which checks everything else (header fields, block
    contents, checksum). libzstd never produces more than one block (128 KiB) per block fed,
    so ``out`` stops growing at most one block past ``capacity``.
    """
    end = len(data)
    if data[pos : pos + 4] != _ZSTD_MAGIC:
        raise FrameError(f"zstd: no zstd frame at offset {pos} of the compressed body")
    descriptor = data[pos + 4]
    single_segment = bool(descriptor & 0x20)
    content_size_code = descriptor >> 6
    header_len = (
        5  # magic, frame header descriptor
        + (0 if single_segment else 1)  # window descriptor
        + (0, 1, 2, 4)[descriptor & 0x03]  # dictionary id
        + (1 if single_segment else 0, 2, 4, 8)[content_size_code]  # content size
    )
    view = memoryview(data)
    stream = decompressor.decompressobj()
    fed = pos
    cursor = pos + header_len
    while True:
        if end - cursor < 3:
            raise FrameError("zstd: frame is truncated")
        block_header = int.from_bytes(data[cursor : cursor + 3], "little")
        block_type = (block_header >> 1) & 0x03
        if block_type == _RESERVED_BLOCK:
            raise FrameError("zstd: reserved block type")
        cursor += 3 + (1 if block_type == _RLE_BLOCK else block_header >> 3)
        if cursor > end:
            raise FrameError("zstd: frame is truncated")
        out += stream.decompress(view[fed:cursor])
        fed = cursor
        if len(out) > capacity:
            raise FrameError(f"zstd: content exceeds the {capacity}-byte body the header declares")
        if block_header & 0x01:  # last block
            break
    if descriptor & 0x04:  # content checksum
        cursor += 4
        if cursor > end:
            raise FrameError("zstd: content checksum is truncated")
        out += stream.decompress(view[fed:cursor])
    # libzstd verifies the checksum as the frame completes: it must have completed right here.
    if not stream.eof or stream.unused_data:
        raise FrameError("zstd: frame does not end after its last block")
    return cursor


def _b64decode(text: str) -> bytes:
    """Decodes padded standard base64, accepting only the canonical form (as Rust's base64)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as err:
        raise FrameError(f"not base64: {err}") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise FrameError("not base64: not in canonical padded form")
    return raw


def iter_kinesis_event(event: Mapping[str, Any]) -> Iterator[Record]:
    """Yields the records of every frame in a Lambda Kinesis event, in order.

    Raises FrameError, naming the Kinesis sequence number, at the first record whose data is
    not a valid frame. To skip or report bad records instead, call ``decode_frame`` on each
    ``base64.b64decode(r["kinesis"]["data"])`` yourself.
    """
    for entry in event["Records"]:
        kinesis = entry["kinesis"]
        try:
            frame = decode_frame(_b64decode(kinesis["data"]))
        except FrameError as err:
            number = kinesis.get("sequenceNumber", "?")
            raise FrameError(f"Kinesis record {number}: {err}") from err
        yield from frame.records


def json_line(record: Record) -> str:
    """The JSON line ``edgeship decode`` prints for a record (serde_json's compact form)."""
    line = {
        "gateway": record.gateway,
        "id": record.id,
        "seq": record.seq,
        "topic": record.topic,
        "ts_ms": record.ts_ms,
    }
    if record.key:
        line["key"] = record.key
    try:
        line["payload"] = record.payload.decode("utf-8")
    except UnicodeDecodeError:
        line["payload_base64"] = base64.b64encode(record.payload).decode("ascii")
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _split_input(data: bytes) -> List[Union[bytes, FrameError]]:
    """The frames one input holds, as ``edgeship decode`` splits it, or why one is unusable.

    Input starting with the magic is one raw frame. Anything else must be UTF-8 text of base64
    records separated by whitespace.
    """
    if data.startswith(MAGIC):
        return [data]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [FrameError("input is neither an edgeship frame nor base64 text")]
    items: List[Union[bytes, FrameError]] = []
    for token in _WHITESPACE.split(text):
        if token:
            try:
                items.append(_b64decode(token))
            except FrameError as err:
                items.append(err)
    return items


def main(argv: Union[List[str], None] = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Decode edgeship frames (raw, or base64 one record per line) into JSON lines.",
    )
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help='files to read; none or "-" reads stdin',
    )
    files = parser.parse_args(argv).files
    # Every input is read before anything is decoded: an unreadable file prints nothing.
    if all(name == "-" for name in files):
        inputs = [("stdin", sys.stdin.buffer.read())]
    else:
        inputs = []
        for name in files:
            try:
                with open(name, "rb") as f:
                    inputs.append((name, f.read()))
            except OSError as err:
                reason = f"{err.strerror} (os error {err.errno})"
                print(f"{_PROG}: reading {name}: {reason}", file=sys.stderr)
                return 1
    out = sys.stdout.buffer
    failures = 0
    try:
        for name, data in inputs:
            for number, item in enumerate(_split_input(data), 1):
                try:
                    if isinstance(item, FrameError):
                        raise item
                    frame = decode_frame(item)
                except FrameError as err:
                    failures += 1
                    print(f"{_PROG}: {name}: record {number}: {err}", file=sys.stderr)
                    continue
                for record in frame.records:
                    out.write(json_line(record).encode("utf-8") + b"\n")
        out.flush()
    except BrokenPipeError as err:
        # Keep the interpreter from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"{_PROG}: {err.strerror} (os error {err.errno})", file=sys.stderr)
        return 1
    return 3 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
