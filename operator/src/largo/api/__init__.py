"""largo.api."""
