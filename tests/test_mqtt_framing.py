"""The fixed header shared by both protocol versions: lengths, partial headers, and what is not MQTT."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotbox.mqtt.errors import MalformedPacket
from spotbox.mqtt.framing import MAX_REMAINING_LENGTH, encode_length, fixed_header, frame

# The boundaries of the variable-length encoding (MQTT 3.1.1 table 2.4).
BOUNDARIES = [
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"),
    (2_097_152, b"\x80\x80\x80\x01"),
    (268_435_455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize(("length", "encoded"), BOUNDARIES)
def test_encode_length_matches_the_standard_table(length: int, encoded: bytes) -> None:
    """Test that each boundary length encodes in the fewest bytes, as the standard's table shows."""
    assert encode_length(length) == encoded


@pytest.mark.parametrize(("length", "encoded"), BOUNDARIES)
def test_fixed_header_reads_every_length_width(length: int, encoded: bytes) -> None:
    """Test that a header of one to four length bytes gives the first byte, the length and the header size."""
    assert fixed_header(b"\x30" + encoded) == (0x30, length, 1 + len(encoded))


@pytest.mark.parametrize(("length", "encoded"), BOUNDARIES)
def test_fixed_header_waits_for_the_whole_header(length: int, encoded: bytes) -> None:
    """Test that a header cut anywhere before its last length byte asks for more bytes instead of guessing."""
    whole = b"\x30" + encoded
    for cut in range(len(whole)):
        assert fixed_header(whole[:cut]) is None


def test_fixed_header_reads_at_an_offset_in_a_shared_buffer() -> None:
    """Test that a header after another packet in the same buffer is read from `start`."""
    buf = bytearray(b"\xd0\x00" + b"\x30\x80\x01" + bytes(128))
    assert fixed_header(buf, 2) == (0x30, 128, 3)
    assert fixed_header(memoryview(buf), 2) == (0x30, 128, 3)
    assert fixed_header(buf, len(buf) - 1) is None


def test_a_fifth_length_byte_is_malformed() -> None:
    """Test that a remaining length continued past four bytes is refused, not read as a huge length."""
    with pytest.raises(MalformedPacket, match="four bytes"):
        fixed_header(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(MalformedPacket):
        fixed_header(b"\x30\x80\x80\x80\x80")  # refused as soon as the fifth byte is there


def test_encode_length_refuses_what_four_bytes_cannot_hold() -> None:
    """Test that a body over 268,435,455 bytes cannot be framed."""
    with pytest.raises(ValueError, match="over"):
        encode_length(MAX_REMAINING_LENGTH + 1)


@given(st.integers(min_value=0, max_value=MAX_REMAINING_LENGTH), st.integers(min_value=0, max_value=255))
def test_length_round_trip(length: int, first: int) -> None:
    """Test that every encodable length reads back from its header."""
    encoded = encode_length(length)
    assert fixed_header(bytes((first,)) + encoded) == (first, length, 1 + len(encoded))


def test_frame_puts_the_header_before_the_body() -> None:
    """Test that frame() builds a packet whose header describes its body."""
    packet = frame(0x82, bytes(200))
    assert fixed_header(packet) == (0x82, 200, 3)
    assert packet[3:] == bytes(200)
