"""The foundations every room stands on: errors, atomic writes, paths, timing, the stage
entry wrapper, the log10 search, the metrics and the tables' vocabulary, code provenance.
Imports nothing of lalora outside this room."""
