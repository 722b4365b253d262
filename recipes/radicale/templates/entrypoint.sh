#!/bin/sh
# Placeholder until the radicale recipe lands.
exec sleep infinity
