"""gRPC plumbing shared by every service: proto <-> Python conversion, servers, channels."""
