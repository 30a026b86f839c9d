"""Settings (data), agent profiles, and the one place that builds each agent's objects from them."""
