"""The contract between the HTTP service and the FHE runner: typed calls and answers (`RunnerAPI`), and the
one error type with its JSON shape."""
