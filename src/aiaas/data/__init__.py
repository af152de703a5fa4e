"""Reading and profiling tabular, text and image data: no HTTP, no tenants, no database."""
