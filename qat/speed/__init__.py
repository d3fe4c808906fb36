"""Placeholder; filled in by the speed-wing commit."""
