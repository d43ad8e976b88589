"""The evaluation-key lifecycle: key-id and size rules, uploads whole or in parts, verification hand-off,
the stores (`file://`, `s3://`), the registry's limits and TTL, and the engines' warm-key cache policy."""
