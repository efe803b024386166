"""Shared by every test folder: importing this puts ``tests/`` on the path,
so helpers that serve several folders (``structure_mutations``) live here."""
