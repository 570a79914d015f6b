"""Tests of edgeship_decode: the format on its own, then against the real agent binary.

Run: python3 -m unittest discover -s consumers/python -v

The binary is $EDGESHIP_BIN, by default /var/tmp/edgeship-target/release/edgeship; the tests
that need it are skipped when it does not exist. They make frames with `edgeship demo` and
compare this module with `edgeship decode` on the same inputs, byte for byte.
"""

import base64
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import unittest
from pathlib import Path

import zstandard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import edgeship_decode as ed  # noqa: E402

BIN = Path(os.environ.get("EDGESHIP_BIN", "/var/tmp/edgeship-target/release/edgeship"))
MODULE = HERE / "edgeship_decode.py"

# The worked example of FORMAT.md: gateway "gw", one record (seq 5, ts_ms 9, "a/b", "{}").
DOC_EXAMPLE = bytes.fromhex("4553485001000267770100000009000000050903612f62027b7d")
DOC_EXAMPLE_LINE = '{"gateway":"gw","id":"gw:5","payload":"{}","seq":5,"topic":"a/b","ts_ms":9}'
# Its version 2 form: the record carries its partition key "d1".
DOC_EXAMPLE_V2 = bytes.fromhex("455348500200026777010000000c000000050902643103612f62027b7d")
DOC_EXAMPLE_V2_LINE = (
    '{"gateway":"gw","id":"gw:5","key":"d1","payload":"{}","seq":5,"topic":"a/b","ts_ms":9}'
)
# Its version 3 form: an index section (id and time as zigzag differences, key, topic, payload
# length), then the payloads.
DOC_EXAMPLE_V3 = bytes.fromhex(
    "455348500300026777010000000c0000000a0000000a0000000a1202643103612f62027b7d"
)


def varint(value):
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def record_bytes(seq, ts_ms, topic, payload):
    topic = topic.encode() if isinstance(topic, str) else topic
    return varint(seq) + varint(ts_ms) + varint(len(topic)) + topic + varint(len(payload)) + payload


def record_bytes_v2(seq, ts_ms, key, topic, payload):
    key = key.encode() if isinstance(key, str) else key
    rest = record_bytes(seq, ts_ms, topic, payload)[len(varint(seq)) + len(varint(ts_ms)) :]
    return varint(seq) + varint(ts_ms) + varint(len(key)) + key + rest


def zigzag(delta):
    delta &= (1 << 64) - 1
    signed = delta - (1 << 64) if delta >> 63 else delta
    return ((signed << 1) ^ (signed >> 63)) & ((1 << 64) - 1)


def sections_v3(records):
    """A version 3 body's index and payload sections for (seq, ts_ms, key, topic, payload)."""
    index, payloads, seq, ts = bytearray(), bytearray(), 0, 0
    for r_seq, r_ts, key, topic, payload in records:
        key = key.encode() if isinstance(key, str) else key
        topic = topic.encode() if isinstance(topic, str) else topic
        index += varint(zigzag(r_seq - seq)) + varint(zigzag(r_ts - ts))
        index += varint(len(key)) + key + varint(len(topic)) + topic + varint(len(payload))
        payloads += payload
        seq, ts = r_seq, r_ts
    return bytes(index), bytes(payloads)


def frame_v3(gateway, count, index, payloads, compress=False, index_len=None, stored=None):
    """A version 3 frame around its sections, each compressed on its own if ``compress``."""
    stored_index = zstd(index) if compress else index
    body = struct.pack(
        "<II",
        len(index) if index_len is None else index_len,
        len(stored_index) if stored is None else stored,
    )
    body += stored_index + (zstd(payloads) if compress else payloads)
    return frame_bytes(
        gateway,
        count,
        b"",
        body,
        flags=ed.FLAG_ZSTD if compress else 0,
        body_len=len(index) + len(payloads),
        version=3,
    )


def frame_bytes(gateway, count, body, compressed=None, flags=None, body_len=None, version=1):
    """A frame around ``body``; ``compressed`` (if given) is what follows the header instead."""
    gateway = gateway.encode() if isinstance(gateway, str) else gateway
    if flags is None:
        flags = ed.FLAG_ZSTD if compressed is not None else 0
    header = b"ESHP" + bytes([version, flags, len(gateway)]) + gateway
    header += struct.pack("<II", count, len(body) if body_len is None else body_len)
    return header + (body if compressed is None else compressed)


def zstd(data, checksum=True, content_size=True):
    compressor = zstandard.ZstdCompressor(write_checksum=checksum, write_content_size=content_size)
    return compressor.compress(data)


def raw_block_frame(content, window_log=20):
    """A zstd frame holding ``content`` as a single raw block, no checksum."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0x00, (window_log - 10) << 3])
    return header + struct.pack("<I", len(content) << 3 | 1)[:3] + content


SAMPLE = [
    (0, 0, "", b""),
    (5, 1_764_000_000_000, "devices/d1/telemetry", b'{"t":21.5}'),
    (2**64 - 1, 2**64 - 1, "t", b"\xff\x00\xfe"),
]
SAMPLE_BODY = b"".join(record_bytes(*r) for r in SAMPLE)

# Frames whose every byte both decoders must treat alike: escaping of each control character
# and of non-ASCII text, payloads that are not UTF-8, varint corner cases, zstd streams made of
# several or skippable frames, trailing bytes, lying lengths.
_TEXT = "".join(map(chr, range(0x80))) + "é😀\u2028\u2029\ufeff\uffff\u0085\u00a0\U0010ffff"
_ESCAPES = b"".join(
    [
        record_bytes(1, 2, _TEXT, _TEXT.encode()),
        record_bytes(2, 2, "x", b"\xed\xa0\x80"),  # an encoded surrogate is not UTF-8
        record_bytes(3, 2, "x", b"\xc0\x80"),  # nor is an overlong form
        record_bytes(4, 2, "x", b"\xf4\x90\x80\x80"),  # nor a code point past U+10FFFF
    ]
)
_ONE = record_bytes(5, 9, "a/b", b"{}")
_V2 = record_bytes_v2(1, 2, _TEXT, "t/1", b"{}") + record_bytes_v2(2, 2, "", "t/2", b"\xff")
_SKIPPABLE = struct.pack("<II", 0x184D2A53, 3) + b"abc"
_V3 = sections_v3(
    [(2**64 - 1, 5, _TEXT, "t/1", _TEXT.encode()), (3, 2**64 - 2, "", "t/2", b"\xff")]
)
CRAFTED = {
    "escapes plain": frame_bytes("gw-é", 4, _ESCAPES),
    "escapes zstd": frame_bytes("gw", 4, _ESCAPES, zstd(_ESCAPES)),
    "sample": frame_bytes("gw", 3, SAMPLE_BODY, zstd(SAMPLE_BODY)),
    "gateway of 255 bytes": frame_bytes("g" * 255, 1, _ONE),
    "10-byte varint past 64 bits": frame_bytes("gw", 1, b"\xff" * 9 + b"\x7f" + _ONE[1:]),
    "11-byte varint": frame_bytes("gw", 1, b"\xff" * 10 + b"\x01" + _ONE[1:]),
    "overlong varint": frame_bytes("gw", 1, b"\x85\x00" + _ONE[1:]),
    "length past the body": frame_bytes("gw", 1, _ONE[:2] + varint(2**64 - 1) + b"a"),
    "zstd frames back to back": frame_bytes("gw", 2, _ONE * 2, zstd(_ONE) * 2),
    "body split over zstd frames": frame_bytes("gw", 1, _ONE, zstd(_ONE[:4]) + zstd(_ONE[4:])),
    "skippable frame before": frame_bytes("gw", 1, _ONE, _SKIPPABLE + zstd(_ONE)),
    "skippable frame after": frame_bytes("gw", 1, _ONE, zstd(_ONE) + _SKIPPABLE),
    "only a skippable frame": frame_bytes("gw", 0, b"", _SKIPPABLE),
    "truncated skippable frame": frame_bytes("gw", 1, _ONE, zstd(_ONE) + _SKIPPABLE[:-1]),
    "no zstd checksum": frame_bytes("gw", 1, _ONE, zstd(_ONE, checksum=False)),
    "no zstd content size": frame_bytes("gw", 1, _ONE, zstd(_ONE, content_size=False)),
    "raw zstd block": frame_bytes("gw", 1, _ONE, raw_block_frame(_ONE)),
    # Beyond the 128 MiB window libzstd's streaming decoder accepts by default.
    "zstd window of 256 MiB": frame_bytes("gw", 1, _ONE, raw_block_frame(_ONE, window_log=28)),
    "compressed, nothing after the header": frame_bytes("gw", 0, b"", b""),
    "compressed, no body, one record": frame_bytes("gw", 1, b"", b""),
    "empty zstd frame": frame_bytes("gw", 0, b"", zstd(b"")),
    "legacy zstd magic": frame_bytes("gw", 1, _ONE, b"\x27" + zstd(_ONE)[1:]),
    "body_len 1 short": frame_bytes("gw", 1, _ONE, zstd(_ONE), body_len=len(_ONE) - 1),
    "body_len 1 long": frame_bytes("gw", 1, _ONE, zstd(_ONE), body_len=len(_ONE) + 1),
    "body_len at the limit": frame_bytes("gw", 1, _ONE, zstd(_ONE), body_len=ed.MAX_BODY_BYTES),
    "body_len past the limit": frame_bytes(
        "gw", 1, _ONE, zstd(_ONE), body_len=ed.MAX_BODY_BYTES + 1
    ),
    "plain body longer than body_len": frame_bytes("gw", 1, _ONE + b"x", body_len=len(_ONE)),
    "count 1 too high": frame_bytes("gw", 2, _ONE),
    "count far too high": frame_bytes("gw", 100, _ONE),
    "count 1 too low": frame_bytes("gw", 0, _ONE),
    "unknown flag": frame_bytes("gw", 1, _ONE, flags=0x03),
    "version 2": DOC_EXAMPLE_V2,
    "version 2, keys escaped, zstd": frame_bytes(
        "gw", 2, _V2, zstd(_V2), version=2
    ),
    "version 2 body read as version 1": frame_bytes("gw", 2, _V2, version=1),
    "version 1 body read as version 2": frame_bytes("gw", 1, _ONE, version=2),
    "version 2, key past the body": frame_bytes("gw", 1, _ONE[:2] + varint(99) + b"k", version=2),
    "version 2, key not UTF-8": frame_bytes(
        "gw", 1, record_bytes_v2(5, 9, b"\xff", "a/b", b"{}"), version=2
    ),
    "version 1 body read as version 3": frame_bytes("gw", 1, _ONE, version=3),
    "version 3": DOC_EXAMPLE_V3,
    "version 3, escaped, zstd": frame_v3("gw", 2, *_V3, compress=True),
    "version 3, plain": frame_v3("gw", 2, *_V3),
    "version 3, index_len past the body": frame_v3("gw", 2, *_V3, index_len=99_999),
    "version 3, index stored past the input": frame_v3("gw", 2, *_V3, compress=True, stored=9999),
    "version 3, index stored short": frame_v3("gw", 2, *_V3, compress=True, stored=5),
    "version 3, plain index stored length differs": frame_v3("gw", 2, *_V3, stored=1),
    "version 3, payload past its section": frame_v3("gw", 2, _V3[0], _V3[1][:-1]),
    "version 3, a payload byte left over": frame_v3("gw", 2, _V3[0], _V3[1] + b"x"),
    "version 3, count 1 too high": frame_v3("gw", 3, *_V3),
    "version 3, count 1 too low": frame_v3("gw", 1, *_V3),
    "version 4": DOC_EXAMPLE[:4] + b"\x04" + DOC_EXAMPLE[5:],
}
for _n in range(1, 10):
    CRAFTED[f"{_n} bytes after the zstd frame"] = frame_bytes("gw", 1, _ONE, zstd(_ONE) + bytes(_n))


class FormatTests(unittest.TestCase):
    """The decoder on hand-built frames; needs no binary."""

    def test_documented_example(self):
        frame = ed.decode_frame(DOC_EXAMPLE)
        self.assertEqual(frame.gateway, "gw")
        self.assertEqual(frame.records, [ed.Record("gw:5", 5, "gw", "a/b", 9, b"{}")])
        self.assertEqual(ed.json_line(frame.records[0]), DOC_EXAMPLE_LINE)

    def test_documented_version_2_example(self):
        frame = ed.decode_frame(DOC_EXAMPLE_V2)
        self.assertEqual(frame.records, [ed.Record("gw:5", 5, "gw", "a/b", 9, b"{}", "d1")])
        self.assertEqual(ed.json_line(frame.records[0]), DOC_EXAMPLE_V2_LINE)
        body = b"".join(record_bytes_v2(i, i, f"d{i % 3}", "t", b"x") for i in range(50))
        records = ed.decode_frame(frame_bytes("gw", 50, body, zstd(body), version=2)).records
        self.assertEqual([r.key for r in records], [f"d{i % 3}" for i in range(50)])

    def test_documented_version_3_example(self):
        frame = ed.decode_frame(DOC_EXAMPLE_V3)
        self.assertEqual(frame.records, [ed.Record("gw:5", 5, "gw", "a/b", 9, b"{}", "d1")])
        self.assertEqual(ed.json_line(frame.records[0]), DOC_EXAMPLE_V2_LINE)
        self.assertEqual(frame_v3("gw", 1, *sections_v3([(5, 9, "d1", "a/b", b"{}")])), DOC_EXAMPLE_V3)

    def test_version_3_round_trip_with_differences_that_wrap(self):
        rng = random.Random(3)
        records = [(0, 0, "", "", b"")]
        records += [
            (rng.randrange(2**64), rng.randrange(2**64), f"d{i % 7}", f"t/{i}", rng.randbytes(i % 50))
            for i in range(500)
        ]
        records += [(2**64 - 1, 2**64 - 1, "k", "t", b"x"), (1, 0, "k", "t", b"")]
        index, payloads = sections_v3(records)
        for compress in (False, True):
            data = frame_v3("gw", len(records), index, payloads, compress=compress)
            got = [(r.seq, r.ts_ms, r.key, r.topic, r.payload) for r in ed.decode_frame(data).records]
            self.assertEqual(got, records)
            self.assertEqual(len(list(ed.iter_frame(data))), len(records))
        cases = {
            "an index of": CRAFTED["version 3, index_len past the body"],
            "truncated: index section": CRAFTED["version 3, index stored past the input"],
            "stored in 1 bytes": CRAFTED["version 3, plain index stored length differs"],
            "payload beyond the payload section": CRAFTED["version 3, payload past its section"],
            "1 bytes after the last payload": CRAFTED["version 3, a payload byte left over"],
            "bytes after the last index entry": CRAFTED["version 3, count 1 too low"],
            "truncated: section lengths": DOC_EXAMPLE_V3[:20],
        }
        for reason, data in cases.items():
            with self.subTest(reason), self.assertRaisesRegex(ed.FrameError, re.escape(reason)):
                ed.decode_frame(data)

    def test_round_trip_plain_and_compressed(self):
        plain = frame_bytes("gw-1", 3, SAMPLE_BODY)
        compressed = frame_bytes("gw-1", 3, SAMPLE_BODY, zstd(SAMPLE_BODY))
        for data in (plain, compressed):
            frame = ed.decode_frame(bytearray(data))
            self.assertEqual(frame.gateway, "gw-1")
            self.assertEqual(
                [(r.seq, r.ts_ms, r.topic, r.payload) for r in frame.records], SAMPLE
            )
            self.assertEqual([r.id for r in frame.records], [f"gw-1:{s}" for s, *_ in SAMPLE])

    def test_multi_block_body(self):
        rng = random.Random(1)
        records = [(i, i, f"d/{i % 9}", rng.randbytes(300)) for i in range(2000)]
        body = b"".join(record_bytes(*r) for r in records)
        self.assertGreater(len(body), 4 * 128 * 1024)
        frame = ed.decode_frame(frame_bytes("gw", len(records), body, zstd(body)))
        self.assertEqual([(r.seq, r.ts_ms, r.topic, r.payload) for r in frame.records], records)

    def test_json_line_falls_back_to_base64(self):
        line = ed.json_line(ed.Record("gw:6", 6, "gw", "t", 9, b"\xff\x00"))
        self.assertEqual(
            line,
            '{"gateway":"gw","id":"gw:6","payload_base64":"/wA=","seq":6,"topic":"t","ts_ms":9}',
        )

    def test_varints_keep_the_low_64_bits_like_the_agent(self):
        frame = ed.decode_frame(CRAFTED["10-byte varint past 64 bits"])
        self.assertEqual(frame.records[0].seq, 2**64 - 1)

    def test_malformed_frames_are_refused_with_a_reason(self):
        body = SAMPLE_BODY
        good_zstd = zstd(body)
        bad_checksum = bytearray(good_zstd)
        bad_checksum[-1] ^= 1
        cases = {
            "magic bytes missing": b"ESHX" + DOC_EXAMPLE[4:],
            "version 4 is not supported": CRAFTED["version 4"],
            "unknown frame flags 0x02": frame_bytes("gw", 3, body, flags=0x02),
            "truncated: header": DOC_EXAMPLE[:6],
            "truncated: gateway id": DOC_EXAMPLE[:8],
            "truncated: counts": DOC_EXAMPLE[:12],
            "truncated: body": DOC_EXAMPLE[:-1],
            "gateway id is not UTF-8": frame_bytes(b"\xff", 3, body),
            "268435457 bytes exceeds the 268435456-byte limit": CRAFTED["body_len past the limit"],
            "checksum": frame_bytes("gw", 3, body, bytes(bad_checksum)),
            "1 bytes after the last zstd frame": frame_bytes("gw", 3, body, good_zstd + b"\0"),
            "content exceeds the 8-byte body": CRAFTED["body_len 1 short"],
            "decompressed to 9 bytes, header says 10": CRAFTED["body_len 1 long"],
            "100 records cannot fit in 9 bytes": CRAFTED["count far too high"],
            "9 bytes after the last record": CRAFTED["count 1 too low"],
            "topic is not UTF-8": frame_bytes("gw", 1, record_bytes(1, 1, b"\xff", b"")),
            "truncated: varint": frame_bytes("gw", 1, b"\x85"),
            "field length beyond the body": CRAFTED["length past the body"],
            "varint longer than 10 bytes": CRAFTED["11-byte varint"],
            "no zstd frame": CRAFTED["legacy zstd magic"],
            "skippable frame is truncated": CRAFTED["truncated skippable frame"],
        }
        for reason, data in cases.items():
            with self.subTest(reason), self.assertRaisesRegex(ed.FrameError, re.escape(reason)):
                ed.decode_frame(data)
        self.assertTrue(issubclass(ed.FrameError, ValueError))

    def test_every_truncation_and_byte_change_of_a_compressed_frame(self):
        data = frame_bytes("gw", 3, SAMPLE_BODY, zstd(SAMPLE_BODY))
        for cut in range(len(data)):
            with self.assertRaises(ed.FrameError, msg=f"cut at {cut}"):
                ed.decode_frame(data[:cut])
        for pos in range(len(data)):
            for mask in (0x01, 0x5A, 0xFF):
                changed = bytearray(data)
                changed[pos] ^= mask
                assert_decodes_the_same_or_fails(self, data, bytes(changed), pos)

    def test_a_compression_bomb_is_stopped_early(self):
        bomb = zstd(bytes(32 << 20), content_size=False)
        data = frame_bytes("gw", 1, b"", bomb, body_len=1000)
        tracemalloc.start()
        try:
            with self.assertRaisesRegex(ed.FrameError, "content exceeds the 1000-byte body"):
                ed.decode_frame(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 1 << 20)

    def test_a_bomb_of_empty_records_is_refused_by_what_the_input_can_hold(self):
        # 256 MiB of empty records compress to a few KB; decoding them used to take about
        # 13 GB of Record objects. Refused at the header, before anything is allocated.
        body_len = 256 << 20
        compressor = zstandard.ZstdCompressor(level=19)
        chunks = compressor.compressobj()
        compressed = b"".join(chunks.compress(bytes(1 << 20)) for _ in range(256)) + chunks.flush()
        data = frame_bytes("gw", body_len // 4, b"", compressed, body_len=body_len)
        tracemalloc.start()
        try:
            with self.assertRaisesRegex(ed.FrameError, "cannot come from"):
                ed.decode_frame(data)
            with self.assertRaisesRegex(ed.FrameError, "cannot come from"):
                ed.iter_frame(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 1 << 20)

    def test_records_stream_one_at_a_time(self):
        body = bytes(1 << 20)  # 262,144 empty records with seq 0
        data = frame_bytes("gw", len(body) // 4, body, zstd(body), body_len=len(body))
        count = 0
        for record in ed.iter_frame(data):
            self.assertEqual((record.seq, record.topic, record.payload), (0, "", b""))
            count += 1
        self.assertEqual(count, len(body) // 4)
        too_many = frame_bytes("gw", ed.MAX_COLLECTED_RECORDS + 1, body, zstd(body), body_len=len(body))
        with self.assertRaisesRegex(ed.FrameError, "records cannot fit|read it as a stream"):
            ed.decode_frame(too_many)

    def test_oversized_raw_block_is_refused(self):
        # Known difference: libzstd's one-shot decoder in the agent accepts a raw or RLE block
        # larger than the 128 KiB block maximum of RFC 8878; the streaming decoder refuses it.
        # No zstd encoder writes such blocks.
        content = record_bytes(1, 1, "t", b"x" * 200_000)
        with self.assertRaisesRegex(ed.FrameError, "zstd: "):
            ed.decode_frame(frame_bytes("gw", 1, content, raw_block_frame(content)))

    def test_lambda_event(self):
        event = {
            "Records": [kinesis_entry(DOC_EXAMPLE, "1"), kinesis_entry(CRAFTED["sample"], "2")]
        }
        records = list(ed.iter_kinesis_event(event))
        self.assertEqual([r.id for r in records], ["gw:5", "gw:0", "gw:5", f"gw:{2**64 - 1}"])
        sequence_number = "49590338271490256608559692538361571095921575989136588898"
        event["Records"].append(kinesis_entry(DOC_EXAMPLE[:-1], sequence_number))
        expected = f"^Kinesis record {sequence_number}: frame is truncated: body$"
        with self.assertRaisesRegex(ed.FrameError, expected):
            list(ed.iter_kinesis_event(event))
        event["Records"][-1] = {"kinesis": {"data": "AB==", "sequenceNumber": "3"}}
        with self.assertRaisesRegex(ed.FrameError, "^Kinesis record 3: not base64"):
            list(ed.iter_kinesis_event(event))


def kinesis_entry(data, sequence_number):
    """One record of a Lambda Kinesis event, as AWS delivers it."""
    return {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": "sensor-000",
            "sequenceNumber": sequence_number,
            "data": base64.b64encode(data).decode(),
            "approximateArrivalTimestamp": 1764000000.0,
        },
        "eventSource": "aws:kinesis",
        "eventName": "aws:kinesis:record",
        "eventSourceARN": "arn:aws:kinesis:eu-west-1:123456789012:stream/edgeship",
        "awsRegion": "eu-west-1",
    }


def assert_decodes_the_same_or_fails(test, original, changed, pos):
    """A changed frame is refused, or decodes to the original records: only the gateway id
    (which no checksum covers) may differ, and only when the change is inside it."""
    try:
        frame = ed.decode_frame(changed)
    except ed.FrameError:
        return
    expected = ed.decode_frame(original)
    test.assertEqual(
        [(r.seq, r.ts_ms, r.topic, r.payload) for r in frame.records],
        [(r.seq, r.ts_ms, r.topic, r.payload) for r in expected.records],
        f"byte {pos} changed: records decoded differently",
    )
    if frame.gateway != expected.gateway:
        test.assertTrue(7 <= pos < 7 + original[6], f"byte {pos} changed the gateway id")


def failed_record_numbers(stderr):
    return [int(n) for n in re.findall(rb": record (\d+): ", stderr)]


@unittest.skipUnless(BIN.is_file(), f"no edgeship binary at {BIN}: build it or set EDGESHIP_BIN")
class AgainstTheAgentTests(unittest.TestCase):
    """Frames written by `edgeship demo`, decoded by this module and by `edgeship decode`."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix="edgeship-decode-py-")
        cls.dir = Path(cls._tmp.name)
        demo = subprocess.run(
            [BIN, "demo", "--devices", "3", "--rate", "20", "--duration", "1s"]
            + ["--dir", cls.dir / "demo"],
            capture_output=True,
            timeout=120,
        )
        if demo.returncode != 0:
            cls._tmp.cleanup()
            output = demo.stdout.decode() + demo.stderr.decode()
            raise RuntimeError(f"edgeship demo failed:\n{output}")
        cls.frame_files = sorted((cls.dir / "demo" / "frames").glob("*.eshp"))
        cls.frames = [f.read_bytes() for f in cls.frame_files]
        if not cls.frames:
            cls._tmp.cleanup()
            raise RuntimeError("edgeship demo wrote no frames")

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def write(self, name, data):
        path = self.dir / name
        path.write_bytes(data)
        return path

    def run_both(self, args, stdin=b""):
        """Runs `edgeship decode` and this module's command line with the same arguments."""
        args = [str(a) for a in args]
        agent = subprocess.run([BIN, "decode", *args], input=stdin, capture_output=True)
        module = subprocess.run([sys.executable, MODULE, *args], input=stdin, capture_output=True)
        return agent, module

    def assert_same_output(self, args, stdin=b""):
        agent, module = self.run_both(args, stdin)
        self.assertEqual(module.stdout, agent.stdout)
        self.assertEqual(module.returncode, agent.returncode, module.stderr.decode())
        self.assertEqual(failed_record_numbers(module.stderr), failed_record_numbers(agent.stderr))
        return agent

    def test_demo_frames_decode(self):
        ids = []
        for data in self.frames:
            frame = ed.decode_frame(data)
            self.assertEqual(frame.gateway, "demo-gw")
            self.assertTrue(frame.records)
            for r in frame.records:
                self.assertEqual((r.id, r.gateway), (f"demo-gw:{r.seq}", "demo-gw"))
                self.assertRegex(r.topic, r"^devices/sensor-\d{3}/telemetry$")
                self.assertTrue(r.payload.startswith(b'{"device":"sensor-'))
            ids += [r.id for r in frame.records]
        self.assertEqual(len(ids), len(set(ids)))

    def test_cli_matches_agent_on_raw_files(self):
        agent = self.assert_same_output(self.frame_files)
        self.assertEqual(agent.returncode, 0)
        records = sum(len(ed.decode_frame(f).records) for f in self.frames)
        self.assertEqual(len(agent.stdout.splitlines()), records)

    def test_cli_matches_agent_on_base64_lines(self):
        text = "".join(base64.b64encode(f).decode() + "\n" for f in self.frames).encode()
        path = self.write("records.b64", text)
        raw = self.assert_same_output(self.frame_files).stdout
        self.assertEqual(self.assert_same_output([path]).stdout, raw)
        self.assertEqual(self.assert_same_output([], stdin=text).stdout, raw)
        self.assertEqual(self.assert_same_output(["-"], stdin=text).stdout, raw)

    def test_python_m_runs_the_same_command_line(self):
        module = subprocess.run(
            [sys.executable, "-m", "edgeship_decode", self.frame_files[0]],
            capture_output=True,
            cwd=HERE,
        )
        agent = subprocess.run([BIN, "decode", self.frame_files[0]], capture_output=True)
        self.assertEqual((module.returncode, module.stdout), (0, agent.stdout))

    def test_cli_matches_agent_on_crafted_frames(self):
        names = list(CRAFTED)
        text = "\n".join(base64.b64encode(CRAFTED[n]).decode() for n in names).encode()
        agent = self.assert_same_output([], stdin=text)
        failed = set(failed_record_numbers(agent.stderr))
        self.assertEqual(agent.returncode, 3)
        # Both accept some frames FORMAT.md does not allow; see the module's _decompress_exact.
        self.assertNotIn(names.index("zstd frames back to back") + 1, failed)
        self.assertIn(names.index("11-byte varint") + 1, failed)

    def test_cli_matches_agent_on_odd_inputs(self):
        frame = base64.b64encode(DOC_EXAMPLE).decode()
        inputs = {
            "empty": b"",
            "CRLF and Unicode spaces": "".join(
                frame + space for space in ("\r\n", "\u00a0", "\u3000", "\u2028", "\u0085")
            ).encode(),
            "U+001C is not a separator": f"{frame}\x1c{frame}".encode(),
            "non-canonical base64": b"AB== AA AA== ==== Q=JD *** AAAA====",
            "neither frame nor UTF-8": b"\xff\xfe",
            "raw frame and a newline": DOC_EXAMPLE + b"\n",
        }
        for name, data in inputs.items():
            with self.subTest(name):
                self.assert_same_output([self.write("odd", data)])

    def test_cli_matches_agent_on_unreadable_input(self):
        self.assertEqual(self.assert_same_output([self.dir / "missing"]).returncode, 1)
        self.assertEqual(self.assert_same_output([self.frame_files[0], "-"]).returncode, 1)

    def test_every_truncation_of_an_agent_frame_is_refused(self):
        data = max(self.frames, key=len)
        for cut in range(len(data)):
            with self.assertRaises(ed.FrameError, msg=f"cut at {cut}"):
                ed.decode_frame(data[:cut])

    def test_changed_bytes_of_an_agent_frame(self):
        data = max(self.frames, key=len)
        rng = random.Random(7)
        changes = [(pos, data[pos] ^ 0x5A) for pos in range(len(data))]
        changes += [(rng.randrange(len(data)), rng.randrange(256)) for _ in range(300)]
        variants = []
        for pos, value in changes:
            changed = bytearray(data)
            changed[pos] = value
            variants.append(bytes(changed))
            assert_decodes_the_same_or_fails(self, data, variants[-1], pos)
        text = "\n".join(base64.b64encode(v).decode() for v in variants).encode()
        self.assert_same_output([self.write("changed.b64", text)])

    def test_lambda_event_of_agent_frames(self):
        event = {"Records": [kinesis_entry(f, str(i)) for i, f in enumerate(self.frames)]}
        lines = "".join(ed.json_line(r) + "\n" for r in ed.iter_kinesis_event(event))
        agent = subprocess.run([BIN, "decode", *self.frame_files], capture_output=True)
        self.assertEqual(lines.encode(), agent.stdout)


if __name__ == "__main__":
    unittest.main()
