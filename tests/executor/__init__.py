"""Tests of the executor: apply, restore, output formats, loading, the layer walk, eval."""
