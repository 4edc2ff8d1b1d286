"""Tests of `plancc heal` (the `heal` package)."""
