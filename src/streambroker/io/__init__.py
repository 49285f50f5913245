"""Performing the core's effects: connections to pools, the synchronous and asyncio
drivers, and the embedded server. Every socket the broker opens is opened here."""
