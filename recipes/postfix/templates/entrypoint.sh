#!/bin/sh
# Placeholder until the postfix recipe lands.
exec sleep infinity
