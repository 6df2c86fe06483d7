"""Taking the snapshot CRIU dumps: the CRIU runner and one module per snapshot method."""
