"""Test doubles and real test servers that tests and benchmarks start: a real Cashu mint, a fake
Routstr node that takes real ecash. Nothing here is used by `arbstr serve`."""
