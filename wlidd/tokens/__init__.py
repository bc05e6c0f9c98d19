"""Tokens: Workload Identity Federation flows, refreshed before expiry and served locally."""
