"""Method `precopy` (issue 14): memory copied while the target runs."""
