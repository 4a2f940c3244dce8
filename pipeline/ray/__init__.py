"""The engine on Ray: session, scheduling, actor pools, warm actors, storage checks, local clusters."""
