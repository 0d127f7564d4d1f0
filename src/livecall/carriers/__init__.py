"""Carrier adapters: each carrier's media stream and webhooks behind one interface (base.py)."""
