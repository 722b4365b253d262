"""Wizard steps: one blueprint per step."""
