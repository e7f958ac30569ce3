"""The daemon's state: who owns which kernel, sessions and their limits, the kernel pool, permalinks."""
