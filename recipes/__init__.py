"""Recipes that build the models this repository ships (see recipes/README.md)."""
