"""Data that ships offline with packages (no download at run time; DESIGN.md §6)."""
