"""The three learning loops: `instant` (Loop A), and later `background` (B) and `deep` (C)."""
