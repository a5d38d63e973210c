"""Where a stage computes: its device and its data-parallel process group."""
