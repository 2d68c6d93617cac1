"""Training and evaluation: two-phase transfer learning on a labelled folder."""
