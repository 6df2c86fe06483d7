"""Per-architecture register and note layouts. x86_64 is the only one so far."""
