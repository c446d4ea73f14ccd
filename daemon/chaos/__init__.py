"""Chaos on real daemons: a seeded nemesis (partitions, kills, pauses, leaves, slow links,
joins) over the namespace testbed while clients generate, and a checker of what they saw."""
