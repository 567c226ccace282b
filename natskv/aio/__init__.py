"""The async core: the only part of natskv that talks to nats-py. Runs on natskv's loop thread."""
