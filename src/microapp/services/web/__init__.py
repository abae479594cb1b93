"""The web service: serves the browser console and its runtime config."""
