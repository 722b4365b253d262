"""What both processes share: the state layout (named once), safe writes, the error root."""
