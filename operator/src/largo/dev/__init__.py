"""largo.dev."""
