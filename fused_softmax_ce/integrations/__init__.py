"""Integrations with training libraries; each submodule imports its library on demand."""
