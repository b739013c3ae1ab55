"""The rollout server: an inference engine attached to the coordinator (see `server.py`)."""
