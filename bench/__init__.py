"""Linger's benchmark: load generators and a runner that starts the servers itself."""
