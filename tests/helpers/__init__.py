"""Builders and constants shared by the tests (fixtures live in the `conftest.py` files).

  paths      the repository root, examples/, benchmarks/ and the ../shared fixtures
  models     tiny random checkpoints of every family, tokenizers, forward helpers
  plans      plan headers and `write_plan`
  strategies hypothesis strategies that draw plans
  outputs    hashes and JSON of what a command wrote, and checks of a refusal
  layerwise  tiny models and windows for the layer-walk tests
  qwen1      the hand-written Qwen-1 checkpoint
  heal       the options a quick `plancc heal` runs with

A test file imports from here, never from another test file.
"""
