"""largo.runtime."""
