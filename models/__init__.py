"""The served models: how a model folder is found and loaded, and the metadata each request is checked
against (`ModelSpec`)."""
