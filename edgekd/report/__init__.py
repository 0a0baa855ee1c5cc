"""Reports: the assembled JSON, its Markdown rendering, and the terminal summary table."""
