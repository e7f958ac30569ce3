"""The spawner process: its zmq front, the fork server's manager and zygote, and what outlives a kernel."""
