"""The `edgemoe` command line."""
