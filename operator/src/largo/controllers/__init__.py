"""largo.controllers."""
