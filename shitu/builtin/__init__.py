"""shitu's built-in plugins. Each is registered through the ``shitu`` entry point group in
``pyproject.toml``, exactly like a third-party plugin."""
