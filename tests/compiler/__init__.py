"""Tests of the compiler: parsing, checking, formatting, checkpoint facts, targets."""
