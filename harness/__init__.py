"""Test and benchmark harness: real `bentoml serve` and moto processes, crafted Cap'n Proto inputs, load
with faults. Used by `tests/` and `bench/`; not part of the installed product."""
