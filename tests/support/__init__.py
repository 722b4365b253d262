"""What the tiers share: the agent (in a thread or as a process), settings written
the agent's way, a signed-in administrator, and the VM harness's vocabulary."""
