"""The test suite, one folder per package (compiler, executor, plangen, heal), `repo` for
what spans them (the README, both programs, the import layering, benchmark scripts),
and `helpers` for the builders and constants they share."""
