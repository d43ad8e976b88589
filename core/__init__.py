"""What the HTTP service and the FHE runner share: errors, settings, the served models' descriptions, the
strict wire checks, metrics, the runner boundary's types and the server's lifecycle."""
