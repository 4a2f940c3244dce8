"""The bottom layer, under every other package: the project's errors, atomic and durable writes, file
digests and the software version. It imports nothing of the project."""
