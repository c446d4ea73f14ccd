"""Sans-IO protocol cores (membership, consensus, migration) and their seeded network simulator."""
