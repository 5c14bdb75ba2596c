"""Webhook forwarding: every verified delivery, with its connection, passed on to the customer's app."""
