"""Downstream assets: how data engineers consume synced records (pandas DataFrames from the store)."""
