"""Self-healing training: failure handling for one run and a multi-job cluster simulator."""
