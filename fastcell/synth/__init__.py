"""fastcell.synth: a BBBC021-shaped screen with the real design and synthetic pixels.

design.py (which fields: options and selection) -> phenotypes.py (treatment -> morphology
parameters) -> render.py (cells -> stains -> microscope -> uint16 pixels) -> screen.py
(`generate_screen`: parallel, resumable writing in the BBBC021 layout) -> cli.py (`fastcell synth`).
"""
