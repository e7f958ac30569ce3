"""A kernel's files, by descriptors: plain code, run by the spawner (or by the daemon for its own host)."""
