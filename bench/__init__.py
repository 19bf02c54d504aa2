"""Benchmarks: numbers measured side by side in one run, with their conditions. Never tests."""
