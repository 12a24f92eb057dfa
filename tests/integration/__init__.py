"""Tests against a real AUTOMATIC1111 webui (a package, so its conftest does not shadow tests/conftest.py)."""
