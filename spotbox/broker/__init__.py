"""The embedded MQTT broker: amqtt, with validation and durable storage ahead of every status acknowledgement."""

from spotbox.broker.server import SpotboxBroker

__all__ = ["SpotboxBroker"]
