"""Reference models for the demo and tests."""
