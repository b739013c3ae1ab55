"""Redis Streams replay buffer (`replay`), its key names (`keys`), and the embedded server (`embedded`)."""
