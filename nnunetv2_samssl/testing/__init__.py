"""Helpers for tests and demos (real sample data, small fixtures); not used by the trainers."""
