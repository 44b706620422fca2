"""A run's life: windows of rows, units of work, committed results, progress, reports, estimates."""
