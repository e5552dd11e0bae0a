"""The unix-socket client of the daemon's HTTP API, shared by the CLI and the lab (a leaf: it imports no other
netweft package, and stays quick to import)."""
