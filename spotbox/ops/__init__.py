"""Operating the fleet: presence, the registry, alerts with a lifecycle, the rejection record and the webhook."""
