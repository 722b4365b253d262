#!/bin/sh
# Healthy when unbound answers its control channel (on this container's loopback).
unbound-control -c /etc/mailstead/unbound/unbound.conf status >/dev/null
