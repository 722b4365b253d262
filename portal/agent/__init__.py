"""The privileged agent: a narrow JSON-over-unix-socket API run as root."""
