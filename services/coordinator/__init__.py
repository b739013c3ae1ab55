"""The coordinator service: the control plane of the mesh (see `server.py`)."""
