"""Outbound webhooks: sync notifications to the customer's app (after each run) and the signed
delivery they share with webhook forwarding."""
