"""Human-readable outputs: PNG plots (matplotlib, headless) and Markdown summaries."""
