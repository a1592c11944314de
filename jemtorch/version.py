"""The jemtorch version (pyproject.toml says the same; tests/test_cli.py checks it)."""
__version__ = "0.2.0"
