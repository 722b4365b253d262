#!/bin/sh
# Runs as the redis user (compose `user:`); config is mounted read-only.
exec redis-server /etc/mailstead/redis/redis.conf
