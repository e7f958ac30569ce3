"""The daemon's service, which starts and stops its parts, and what it shows its operator (health, metrics)."""
