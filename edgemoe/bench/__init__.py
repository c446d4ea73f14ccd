"""Benchmarks that run strategies (edgemoe.placement) through the simulator (edgemoe.sim)."""
