"""Activation statistics: decayed counters, co-activation reservoir, trace files."""
