"""The report's sections: each reads its stage's files from a run directory and returns a `Section`."""
