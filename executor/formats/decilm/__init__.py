"""plancc's Nemotron-NAS (DeciLM) configuration and modeling module.

These two files are package data: `executor.formats.nemotron_nas` copies them
next to the config.json of every model it writes (`auto_map` points at them),
where transformers and vLLM import them with `trust_remote_code`. They import
only torch and transformers, never plancc.
"""
