"""The placement problem, cost model, strategies, exact solver and migration planner."""
