"""Uplinks: spotbox as an MQTT client (store-and-forward to a cloud broker; cluster mode)."""
