"""Glue for the frameworks users train with (imported on demand: each needs its framework)."""
