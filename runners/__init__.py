"""FHE compute and key state: concrete-ml model runners and the evaluation-key registry."""
