"""The daemon's side of the zmq control channel to spawners, here or on worker hosts."""
