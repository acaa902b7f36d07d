"""Shipped qswap recipes (YAML). Installed as the package ``qswap.recipes``."""
