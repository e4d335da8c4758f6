"""fastcell.synth"""
