"""Adapter methods: one folder or module per method, sharing :mod:`.base`."""
