"""Reusable training mechanics as Lightning callbacks; each knows no method, only a small protocol."""
