"""spotbox: one process from robot MQTT status to storage, live feed and history."""

__version__ = "0.1.0"
