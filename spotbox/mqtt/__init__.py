"""spotbox's own MQTT broker engine: both protocol versions, one connection loop, typed state (issue 10)."""
