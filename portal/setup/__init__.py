"""First-boot setup as the agent runs it: wizard progress, deploy, finish, restore."""
