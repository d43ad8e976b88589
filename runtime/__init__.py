"""What every server process shares at run time: settings, Prometheus metrics, its spool directory and
how it stops with a non-zero status."""
