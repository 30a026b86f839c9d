"""The test suite: pytest over real HTTP on loopback (see conftest.py)."""
