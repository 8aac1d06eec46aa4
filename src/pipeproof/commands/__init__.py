"""Sub-commands of the pipeproof CLI (see pipeproof/cli.py)."""
