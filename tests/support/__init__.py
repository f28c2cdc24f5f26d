"""Test support shared by tests/integration and tests/e2e: child processes
with their logs, free loopback ports, and waits with deadlines."""
