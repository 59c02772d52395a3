"""The command-line layer: cli, admin, demo, status, quick bench, local processes (above node, client, cluster)."""
