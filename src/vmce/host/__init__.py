"""Host-side error sources and handling."""
