"""The IO shell: HTTP server and client, discovery, shard store, inference engine, API."""
