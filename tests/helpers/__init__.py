"""What the tests share: inputs and independent float64 references, tiny models and runs, and process
and read-back harnesses."""
