"""Model-owner tooling: import concrete-ml FHEModelDev folders and build the embedded demo models."""
