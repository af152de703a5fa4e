"""Privacy: finding and redacting personal data."""
