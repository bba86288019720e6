"""Cluster planner: model shapes, hardware, memory and step-time model, search, placement."""
