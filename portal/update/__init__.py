"""Image updates: the signed feed (feed.py), and applying a version with
systemd-sysupdate and boot counting (to come)."""
