"""The repository as a whole: the README, both programs, the import layering, benchmark scripts."""
