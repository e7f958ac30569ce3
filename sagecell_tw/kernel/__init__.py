"""A kernel process, from fork() to the IPython kernel: sandbox, kernel app, output streams."""
