"""Scaling out: the device mesh, logical-axis sharding rules and multi-host setup."""
