"""Message expiry as MQTT 5 defines it: not delivered once expired, forwarded with the time waited taken off."""

from __future__ import annotations

from spotbox.mqtt.message import Message, Properties


def message(expiry: int | None, created: float = 100.0) -> Message:
    """A message received at `created` with the given Message Expiry Interval."""
    properties = Properties(message_expiry_interval=expiry) if expiry is not None else None
    return Message("robot/R-1/status", b"{}", 1, False, properties, created)


def test_a_message_without_expiry_never_expires() -> None:
    """Test that a message without properties, or without an expiry interval, is delivered whenever."""
    for msg in (message(None), Message("t", b"", 0, False, Properties(content_type="x"), 100.0)):
        assert not msg.expired(1e9)
        assert msg.remaining_expiry(1e9) is None


def test_expiry_counts_whole_seconds_waited() -> None:
    """Test that the forwarded interval is the received one minus the whole seconds waited [MQTT-3.3.2-6]."""
    msg = message(10)
    assert msg.remaining_expiry(100.0) == 10
    assert msg.remaining_expiry(100.9) == 10
    assert msg.remaining_expiry(103.2) == 7
    assert msg.remaining_expiry(109.99) == 1
    assert not msg.expired(109.99)


def test_an_expired_message_is_expired_and_has_nothing_left() -> None:
    """Test that at and after its interval a message is expired and its remaining interval is 0 [MQTT-3.3.2-5]."""
    msg = message(10)
    assert msg.expired(110.0)
    assert msg.remaining_expiry(110.0) == 0
    assert msg.expired(500.0)
    assert msg.remaining_expiry(500.0) == 0


def test_a_clock_before_receipt_never_lengthens_the_interval() -> None:
    """Test that a `now` earlier than receipt gives the interval as received, not more."""
    assert message(10).remaining_expiry(90.0) == 10


def test_user_properties_keep_their_order_and_repeats() -> None:
    """Test that user properties are a list of pairs: order and repeated names are kept [MQTT-3.3.2-18]."""
    props = Properties(user_properties=[("b", "1"), ("a", "2"), ("b", "3")])
    assert props.user_properties == [("b", "1"), ("a", "2"), ("b", "3")]
    assert Properties().user_properties == []
    assert Properties().user_properties is not Properties().user_properties
