"""Importance scores, one module per family (depth: angular distance and block
influence; width scores follow). Each is an accumulator fed batch by batch from
the calibration walk, so statistics are collected in one pass."""
