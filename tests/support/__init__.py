"""Test and benchmark helpers (synthetic models, file mutations): not part of the installed package."""
