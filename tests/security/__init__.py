"""Hostile tests: smuggling, header and target confusion, fuzzing, property-based checks."""
