"""Regions nobody drew: class-agnostic masks, labelled and ranked."""
