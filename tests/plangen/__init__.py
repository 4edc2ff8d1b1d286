"""Tests of the planner (`plangen`): analyze, metrics, reconstruction, header, graph."""
